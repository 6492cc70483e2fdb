"""Learnable user preference over KG path types (LKG-RAG step 4), trained by gradient descent.

The reference computes a per-user distribution π_u over relation types but no gradient ever
reaches it. Here π_u scores the 20 candidates of each ranking example from per-type path counts
and is trained with a softmax cross-entropy against the true item, so π_u is the weighting of
path types that best explains what the user chose next. The prompt stage then picks paths of
the types with the highest π_u.

Score of candidate c for the user u of an example (T path types, n(c, t) paths of type t from
the example's history items to c):

    φ(c, t)  = w_t · log1p(n(c, t)) · idf_t
    idf_t    = log((1 + N) / (1 + df_t)) + 1     (N: training (example, candidate) pairs,
                                                  df_t: those with ≥ 1 path of type t)
    w_t      = softplus(ρ_t) ≥ 0, ρ_t initialised so that w_t = 1
    π_u      = softmax(logits_u)  (user-id embedding, or MLP of the user's history profile)
    s_u(c)   = Σ_t π_u[t] · φ(c, t)

π_u says *which* types matter to this user, w_t how informative a type is for everybody; w also
plays the role of a global temperature (all w_t can grow together), so there is no separate one.
A candidate without paths scores 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from lkg_pipeline.core.metrics import rank_of_target, ranking_metrics

UserEncoder = Literal["user_id", "history"]
ENCODERS: tuple[str, ...] = get_args(UserEncoder)
WEIGHTS_FILE = "preference.safetensors"
CONFIG_FILE = "preference.json"
SELECT_METRIC = "NDCG@10"  # validation metric (subset population) that picks the best epoch


@dataclass(frozen=True)
class PreferenceConfig:
    """Hyperparameters of the preference module and its training loop, saved with it."""

    user_encoder: UserEncoder = "user_id"  # "user_id": the paper's per-user logits; "history": MLP
    hidden: int = 32  # hidden width of the history encoder's MLP (T → hidden → T)
    lr: float = 0.05  # Adam(W) learning rate: the parameters are few and start at 0
    weight_decay: float = 0.0  # AdamW decay on encoder weights; logit_l2 is the main prior
    logit_l2: float = 1e-2  # penalty on mean squared logits: pulls sparse users toward uniform
    epochs: int = 50  # passes over the train split; the best validation epoch is kept
    batch_size: int | None = 512  # examples per step; None = full batch (best val on ML-100K)
    seed: int = 42  # seeds init and shuffling: CPU runs are repeatable

    def __post_init__(self) -> None:
        if self.user_encoder not in ENCODERS:
            raise ValueError(
                f"unknown user_encoder {self.user_encoder!r}; choose one of {ENCODERS}"
            )
        assert self.hidden >= 1 and self.epochs >= 0 and self.lr > 0, f"bad config {self}"
        assert self.batch_size is None or self.batch_size >= 1, "batch_size must be >= 1 or None"


class PreferenceModel(nn.Module):
    """π_u from a user encoder, type weights w_t, and the fixed training-set idf_t."""

    def __init__(self, config: PreferenceConfig, path_types: Sequence[str], n_users: int) -> None:
        super().__init__()
        self.config, self.path_types, self.n_users = config, list(path_types), n_users
        t = len(self.path_types)
        assert t >= 1 and n_users >= 1, f"need path types and users, got T={t}, U={n_users}"
        self.register_buffer("idf", torch.ones(t))  # (T,), set by train_preference
        self.type_weight_raw = nn.Parameter(torch.full((t,), math.log(math.e - 1.0)))  # w = 1
        if config.user_encoder == "user_id":
            self.encoder: nn.Module = nn.Embedding(n_users, t)
            nn.init.zeros_(self.encoder.weight)  # uniform π at init, as in the paper
        else:
            self.encoder = nn.Sequential(
                nn.Linear(t, config.hidden), nn.ReLU(), nn.Linear(config.hidden, t)
            )
            nn.init.zeros_(self.encoder[2].weight)  # uniform π at init; the bias learns a prior
            nn.init.zeros_(self.encoder[2].bias)

    def logits(self, users: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        """(B, T) preference logits from the user id or the (B, T) history profile."""
        if self.config.user_encoder == "history":
            return self.encoder(profile)  # (B, T)
        assert bool((users < self.n_users).all()), (
            f"user_idx {int(users.max())} >= n_users={self.n_users}: the user_id encoder knows "
            "no such user (the history encoder serves unseen users)"
        )
        return self.encoder(users)  # (B, T)

    def type_weight(self) -> torch.Tensor:
        """w_t = softplus(ρ_t): non-negative, so more paths of a type never lower a score."""
        return F.softplus(self.type_weight_raw)  # (T,)

    def forward(
        self, users: torch.Tensor, profile: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B, K) with -inf on padding, logits (B, T)) from log1p counts (B, K, T)."""
        logits = self.logits(users, profile)  # (B, T)
        phi = feats * (self.type_weight() * self.idf)  # (B, K, T)
        scores = torch.einsum("bkt,bt->bk", phi, logits.softmax(dim=-1))  # (B, K)
        return scores.masked_fill(~mask, -math.inf), logits


@dataclass
class _Grid:
    """Examples as padded tensors; candidate position k is the order of candidate_item_idxs."""

    example_id: np.ndarray  # (E,) int64
    split: np.ndarray  # (E,) str
    cand: np.ndarray  # (E, K) int64, -1 on padding
    mask: torch.Tensor  # (E, K) bool
    users: torch.Tensor  # (E,) long
    target: torch.Tensor  # (E,) long position of the target, -1 if not among the candidates
    feats: torch.Tensor  # (E, K, T) log1p(n_paths)
    profile: torch.Tensor  # (E, T) normalised history profile of the example's user


@dataclass
class PreferenceResult:
    """What train_preference learnt, with the evidence that π_u moved and helped."""

    model: PreferenceModel  # holds the best epoch's state
    loss_history: list[dict[str, float]]  # per epoch (0 = init): train loss, val loss/metrics
    best_epoch: int
    best_val_ndcg10: float  # val subset NDCG@10 of best_epoch (NaN without val examples)
    pi_shift: dict[str, float] = field(default_factory=dict)  # KL / TV to uniform, init vs final


def _type_codes(values: pl.Series, path_types: Sequence[str], what: str) -> np.ndarray:
    index = {t: i for i, t in enumerate(path_types)}
    unknown = sorted(set(values.unique().to_list()) - index.keys())
    if unknown:
        raise ValueError(f"unknown path types in {what}: {unknown}; vocabulary is {path_types}")
    return values.replace_strict(index, return_dtype=pl.Int64).to_numpy()


def _profiles(history: pl.DataFrame | None, path_types: Sequence[str], users: np.ndarray):
    """(len(users), T) L1-normalised history bag of path types; zeros for an empty history."""
    out = np.zeros((len(users), len(path_types)), dtype=np.float64)
    if history is not None and history.height:
        w = history["weight"].cast(pl.Float64).to_numpy()
        assert np.isfinite(w).all() and (w >= 0).all(), "history weights must be finite and >= 0"
        rows = {int(u): i for i, u in enumerate(users)}
        pos = np.array([rows.get(int(u), -1) for u in history["user_idx"].to_numpy()])
        keep = pos >= 0
        codes = _type_codes(history["path_type"], path_types, "history")
        np.add.at(out, (pos[keep], codes[keep]), w[keep])
    total = out.sum(axis=1, keepdims=True)
    return torch.from_numpy(np.divide(out, total, out=np.zeros_like(out), where=total > 0)).float()


def _candidates(examples: pl.DataFrame) -> _Grid:
    """The candidate grid of the examples, without features (those are filled by _grid)."""
    ids = examples["example_id"].cast(pl.Int64).to_numpy()
    assert len(np.unique(ids)) == len(ids), "example_id must be unique"
    lengths = examples["candidate_item_idxs"].list.len().to_numpy().astype(np.int64)
    assert len(ids) > 0 and (lengths >= 1).all(), "every example needs >= 1 candidate"
    n, k = len(ids), int(lengths.max())
    row = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    cand = np.full((n, k), -1, dtype=np.int64)
    cand[row, pos] = examples["candidate_item_idxs"].explode().cast(pl.Int64).to_numpy()
    targets = examples["target_item_idx"].cast(pl.Int64).to_numpy()
    hit = cand == targets[:, None]  # (E, K)
    target = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    split = examples["split"].to_numpy().astype(str)
    assert (target[split == "train"] >= 0).all(), "train examples must contain their target"
    if "in_candidates" in examples.columns:
        flag = examples["in_candidates"].to_list()
        known = np.array([f is not None for f in flag])
        assert (np.array(flag)[known].astype(bool) == (target[known] >= 0)).all(), (
            "in_candidates disagrees with candidate_item_idxs"
        )
    users = torch.tensor(examples["user_idx"].to_numpy(), dtype=torch.long)
    assert bool((users >= 0).all()), "user_idx must be >= 0"
    mask, empty = torch.from_numpy(cand >= 0), torch.zeros((n, 0))
    return _Grid(ids, split, cand, mask, users, torch.from_numpy(target), empty, empty)


def _cells(g: _Grid) -> pl.DataFrame:
    """(example_id, candidate_item_idx, r, p): every real candidate and its grid cell."""
    r, p = np.nonzero(g.cand >= 0)
    keys = {"example_id": g.example_id[r], "candidate_item_idx": g.cand[r, p], "r": r, "p": p}
    return pl.DataFrame(keys)


def _grid(
    examples: pl.DataFrame,
    pair_features: pl.DataFrame,
    history: pl.DataFrame | None,
    path_types: Sequence[str],
) -> _Grid:
    """Candidates plus features. Pair features of candidates not in an example's list (or of
    absent examples) are ignored; duplicate (example, candidate, type) rows add up."""
    g = _candidates(examples)
    pf = pair_features.select(
        pl.col("example_id").cast(pl.Int64),
        pl.col("candidate_item_idx").cast(pl.Int64),
        "path_type",
        pl.col("n_paths").cast(pl.Float64),
    )
    codes = _type_codes(pf["path_type"], path_types, "pair_features")
    pf = pf.with_columns(code=pl.Series(codes)).join(
        _cells(g), on=["example_id", "candidate_item_idx"]
    )
    assert (pf["n_paths"] >= 0).all(), "n_paths must be >= 0"
    counts = np.zeros((*g.cand.shape, len(path_types)), dtype=np.float32)  # (E, K, T)
    cell = (pf["r"].to_numpy(), pf["p"].to_numpy(), pf["code"].to_numpy())
    np.add.at(counts, cell, pf["n_paths"].to_numpy().astype(np.float32))
    g.feats = torch.from_numpy(np.log1p(counts))
    uniq, inverse = np.unique(g.users.numpy(), return_inverse=True)
    g.profile = _profiles(history, path_types, uniq)[torch.from_numpy(inverse)]  # (E, T)
    return g


def _forward(model: PreferenceModel, g: _Grid, rows: torch.Tensor):
    # index_select, not g.feats[rows]: advanced indexing is ~100x slower on a busy 2-core CPU
    pick = [x.index_select(0, rows) for x in (g.users, g.profile, g.feats, g.mask)]
    return model(*pick)


def _loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(scores, target) if len(target) else torch.tensor(math.nan)


def _ranks(scores: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """1-based target ranks; ties go to the earlier candidate (= retriever order for val/test,
    so a user without any path keeps the retriever's ranking); absent target → inf."""
    ranks = np.full(len(target), np.inf)
    present = target >= 0
    if present.any():
        found = rank_of_target(scores[present], target[present], tie_break="index")
        ranks[present.numpy()] = found.numpy().astype(np.float64)
    return ranks


@torch.no_grad()
def _epoch_log(model: PreferenceModel, g: _Grid, train: torch.Tensor, val: torch.Tensor):
    scores, _ = _forward(model, g, torch.cat([train, val]))
    s_train, s_val = scores[: len(train)], scores[len(train) :]
    log = {
        "loss": float(_loss(s_train, g.target[train])),
        "val_loss": float(_loss(s_val, g.target[val])),
    }
    if len(val):
        metrics = ranking_metrics(_ranks(s_val, g.target[val]), ks=(1, 5, 10))
        log |= {f"val_{name}": value for name, value in metrics.items()}
    return log


@torch.no_grad()
def _pi_stats(model: PreferenceModel, users: torch.Tensor, profile: torch.Tensor):
    """Mean KL(π_u ‖ uniform) and total-variation distance to uniform, over the given users."""
    pi = model.logits(users, profile).softmax(dim=-1).double()  # (U, T)
    t = pi.shape[1]
    kl = (pi * (pi * t).clamp_min(1e-300).log()).sum(dim=1)
    tv = 0.5 * (pi - 1.0 / t).abs().sum(dim=1)
    return float(kl.mean()), float(tv.mean())


def _train_epoch(
    model: PreferenceModel,
    opt: torch.optim.Optimizer,
    g: _Grid,
    train: torch.Tensor,
    config: PreferenceConfig,
    gen: torch.Generator,
) -> None:
    model.train()
    for rows in train[torch.randperm(len(train), generator=gen)].split(
        config.batch_size or len(train)
    ):
        scores, logits = _forward(model, g, rows)  # (B, K), (B, T)
        loss = _loss(scores, g.target[rows]) + config.logit_l2 * logits.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def train_preference(
    examples: pl.DataFrame,
    pair_features: pl.DataFrame,
    history: pl.DataFrame | None,
    path_types: Sequence[str],
    n_users: int,
    config: PreferenceConfig = PreferenceConfig(),
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> PreferenceResult:
    """Fit on the train split and keep the epoch (0 = untrained, uniform π) with the best val
    subset NDCG@10. NDCG saturates on easy data, so ties go to the lower val loss (then the
    earlier epoch); without val examples the lowest train loss wins."""
    g = _grid(examples, pair_features, history, path_types)
    train = torch.from_numpy(np.flatnonzero(g.split == "train"))
    val = torch.from_numpy(np.flatnonzero((g.split == "val") & (g.target.numpy() >= 0)))
    assert len(train), "no train examples"
    present = (g.feats[train] > 0) & g.mask[train][..., None]  # (N_train, K, T)
    n_pairs = float(g.mask[train].sum())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = PreferenceModel(config, path_types, n_users)
    model.idf.copy_(torch.log((1 + n_pairs) / (1 + present.sum(dim=(0, 1)).float())) + 1)
    groups = [
        {"params": model.encoder.parameters(), "weight_decay": config.weight_decay},
        {"params": [model.type_weight_raw], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    first = torch.from_numpy(np.unique(g.users.numpy(), return_index=True)[1])  # one row per user
    users, profiles = g.users[first], g.profile[first]
    kl_init, tv_init = _pi_stats(model, users, profiles)
    metric = f"val_{SELECT_METRIC}"

    def key(entry: dict[str, float]) -> tuple[float, ...]:
        return (entry[metric], -entry["val_loss"]) if len(val) else (-entry["loss"],)

    log: list[dict[str, float]] = []
    best: dict[str, float] = {}
    best_state: dict[str, torch.Tensor] = {}
    for epoch in range(config.epochs + 1):  # epoch 0 only logs the untrained model
        if epoch:
            _train_epoch(model, opt, g, train, config, gen)
        log.append({"epoch": epoch, **_epoch_log(model, g, train, val)})
        if not best or key(log[-1]) > key(best):
            best_state, best = {k: v.clone() for k, v in model.state_dict().items()}, log[-1]
        if on_log:
            on_log(log[-1])
    model.load_state_dict(best_state)
    model.eval()
    kl, tv = _pi_stats(model, users, profiles)
    shift = {"kl_init": kl_init, "tv_init": tv_init, "kl_final": kl, "tv_final": tv}
    return PreferenceResult(
        model, log, int(best["epoch"]), float(best.get(metric, math.nan)), shift
    )


@dataclass
class EncoderChoice:
    """choose_encoder's verdict; both scores are kept so the asset can report the margin."""

    best: PreferenceResult  # the result of the chosen encoder
    encoder: str  # "user_id" or "history"
    val_ndcg10: dict[str, float]  # best-epoch val subset NDCG@10 of each encoder


def choose_encoder(
    examples: pl.DataFrame,
    pair_features: pl.DataFrame,
    history: pl.DataFrame | None,
    path_types: Sequence[str],
    n_users: int,
    config: PreferenceConfig = PreferenceConfig(),
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> EncoderChoice:
    """Train both encoders with the same config; the better val NDCG@10 wins (ties: user_id,
    the paper's choice). config.user_encoder is overridden."""
    data = (examples, pair_features, history, path_types, n_users)
    results = {
        name: train_preference(*data, dataclasses.replace(config, user_encoder=name), on_log)
        for name in ENCODERS
    }
    scores = {name: r.best_val_ndcg10 for name, r in results.items()}
    winner = max(ENCODERS, key=lambda n: -math.inf if math.isnan(scores[n]) else scores[n])
    return EncoderChoice(results[winner], winner, scores)


@torch.no_grad()
def score_examples(
    model: PreferenceModel,
    examples: pl.DataFrame,
    pair_features: pl.DataFrame,
    history: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """(example_id, candidate_item_idx, score) for every candidate, in candidate-list order."""
    assert history is not None or model.config.user_encoder == "user_id", (
        "the history encoder needs the history profile"
    )
    g = _grid(examples, pair_features, history, model.path_types)
    model.eval()
    scores, _ = _forward(model, g, torch.arange(len(g.example_id)))  # (E, K)
    m = g.mask.numpy()
    return pl.DataFrame(
        {
            "example_id": np.repeat(g.example_id, m.sum(axis=1)),
            "candidate_item_idx": g.cand[m],
            "score": scores.numpy()[m],
        },
        schema={"example_id": pl.Int64, "candidate_item_idx": pl.Int32, "score": pl.Float32},
    )


def example_ranks(examples: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """(example_id, split, rank) for each example: the target's 1-based rank under `scores`.

    Ties go to the earlier candidate in candidate_item_idxs (a stable descending sort); an
    example whose target is not a candidate gets rank inf.
    """
    g = _candidates(examples)
    cells = _cells(g)
    keyed = scores.select(pl.col("example_id", "candidate_item_idx").cast(pl.Int64), "score")
    joined = cells.join(keyed, on=["example_id", "candidate_item_idx"], how="left")
    assert joined.height == cells.height, "scores has duplicate (example_id, candidate) rows"
    matrix = np.full(g.cand.shape, -np.inf)  # (E, K); padding never outranks a candidate
    matrix[joined["r"].to_numpy(), joined["p"].to_numpy()] = (
        joined["score"].fill_null(np.nan).to_numpy()
    )
    assert not np.isnan(matrix[g.mask.numpy()]).any(), "scores misses some candidates"
    return pl.DataFrame(
        {
            "example_id": g.example_id,
            "split": g.split,
            "rank": _ranks(torch.from_numpy(matrix), g.target),
        }
    )


def evaluate_rankings(
    examples: pl.DataFrame, scores: pl.DataFrame, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {"subset" | "overall": metrics + n_examples}} for val and test.

    Ranks as in `example_ranks`; an example whose target is not a candidate is a miss and only
    counts in "overall". An empty population gets NaN metrics.
    """
    ranked = example_ranks(examples, scores)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for split in ("val", "test"):
        ranks = ranked.filter(pl.col("split") == split)["rank"].to_numpy()
        if not len(ranks):
            continue
        out[split] = {}
        for population, r in (("subset", ranks[ranks < np.inf]), ("overall", ranks)):
            metrics = ranking_metrics(r if len(r) else np.ones(1), ks)
            if not len(r):
                metrics = dict.fromkeys(metrics, math.nan)
            out[split][population] = {**metrics, "n_examples": float(len(r))}
    return out


@torch.no_grad()
def user_preferences(
    model: PreferenceModel, users: Sequence[int] | None = None, history: pl.DataFrame | None = None
) -> pl.DataFrame:
    """(user_idx, path_type, pi, weight) long table; users=None means 0..n_users-1."""
    assert history is not None or model.config.user_encoder == "user_id", (
        "the history encoder needs the history profile"
    )
    ids = np.arange(model.n_users) if users is None else np.asarray(users, dtype=np.int64)
    pi = model.logits(torch.from_numpy(ids).long(), _profiles(history, model.path_types, ids))
    t = len(model.path_types)
    probs = pi.softmax(dim=-1)  # (U, T)
    # What one path of each type adds to this user's candidate score (before log1p of the
    # count): π_u[t] · w_t · idf_t. Prompts pick paths by it, so a type the user favours but
    # that links almost every pair (a shared country) does not crowd out a shared director.
    weight = probs * (model.type_weight() * model.idf)
    return pl.DataFrame(
        {
            "user_idx": np.repeat(ids, t),
            "path_type": model.path_types * len(ids),
            "pi": probs.numpy().reshape(-1),
            "weight": weight.numpy().reshape(-1),
        },
        schema={
            "user_idx": pl.Int32,
            "path_type": pl.String,
            "pi": pl.Float32,
            "weight": pl.Float32,
        },
    )


def save_preference(
    result_or_model: PreferenceResult | PreferenceModel,
    config: PreferenceConfig,
    path_types: Sequence[str],
    directory: str | Path,
) -> Path:
    """Write preference.safetensors (incl. idf) + preference.json (config, vocabulary, U)."""
    model = getattr(result_or_model, "model", result_or_model)
    assert config == model.config, f"config {config} is not the model's {model.config}"
    assert list(path_types) == model.path_types, "path_types differ from the model's vocabulary"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {
        "config": dataclasses.asdict(config),
        "path_types": model.path_types,
        "n_users": model.n_users,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_preference(directory: str | Path) -> PreferenceModel:
    """The saved model in eval mode; idf is part of the weights, so scores match exactly."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    model = PreferenceModel(PreferenceConfig(**meta["config"]), meta["path_types"], meta["n_users"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return model.eval()
