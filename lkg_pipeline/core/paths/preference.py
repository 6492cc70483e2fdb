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

At 1M users the path counts do not fit in memory as frames (pair_features: 102M rows), so
`read_grid` builds the training grid from kg_paths' files a batch of users at a time and keeps
the exact integer counts (uint8 where they fit, 80 B per example); `preference_ranks` scores
and ranks the other examples batch by batch. Every computation over the grid runs in chunks
of rows, in an order that gives the same numbers, bit for bit, as one pass over in-memory
frames.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from lkg_pipeline.core.evaluate.metrics import rank_of_target, ranking_metrics
from lkg_pipeline.core.paths.enumeration import read_users, user_batches

UserEncoder = Literal["user_id", "history"]
ENCODERS: tuple[str, ...] = get_args(UserEncoder)
WEIGHTS_FILE = "preference.safetensors"
CONFIG_FILE = "preference.json"
SELECT_METRIC = "NDCG@10"  # validation metric (subset population) that picks the best epoch
USERS_PER_BATCH = 2_500  # users whose path counts are read together: bounds memory only
CHUNK_ROWS = 65_536  # examples per chunk of a pass over the grid: (65,536, 20, 4) float32 = 21 MB
SPLITS = ("train", "val", "test")  # PathGrid.split holds the index of an example's split
FEATURE_COLUMNS = ("example_id", "candidate_item_idx", "path_type", "n_paths")
HISTORY_COLUMNS = ("user_idx", "path_type", "weight")


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
            # sparse gradients, so a step touches only its batch's rows (`_optimizers`);
            # SparseAdam has no weight decay, so a decayed table stays dense
            sparse = config.weight_decay == 0
            self.encoder: nn.Module = nn.Embedding(n_users, t, sparse=sparse)
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
class PathGrid:
    """Examples as padded arrays; candidate position k is the order of candidate_item_idxs.

    Path counts are kept as exact integers in the narrowest unsigned type that holds them and
    decoded to log1p(float32) a chunk of rows at a time (`feats`): at 20 candidates × 4 types,
    80 B an example (uint8) instead of 320 B, and no float32 copy of the whole grid. Splits are
    indices into SPLITS (1 B, not a 20 B string). At 1M Beauty-like users the grid is what the
    preference stage holds (benchmarks/AFTER_PATHS.md), so every byte an example saves is
    2 MB there.
    """

    path_types: list[str]
    example_id: np.ndarray  # (E,) int64
    split: np.ndarray  # (E,) uint8 index into SPLITS
    cand: np.ndarray  # (E, K) int32, -1 on padding; (E, 0) from read_grid: training needs none
    mask: torch.Tensor  # (E, K) bool
    users: torch.Tensor  # (E,) long
    target: torch.Tensor  # (E,) long position of the target, -1 if not among the candidates
    counts: np.ndarray  # (E, K, T) n_paths, uint8 unless a count needs a wider type
    profile: torch.Tensor  # (E, T) normalised history profile of the example's user
    user_ids: torch.Tensor  # (U,) long: every user of the examples, ascending (π statistics)
    user_profile: torch.Tensor  # (U, T) their profiles

    def feats(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, K, T) float32 log1p(n_paths) of grid rows: decoded per use, by np.log1p of the
        float32 counts, so the numbers are those of a float32 grid kept whole."""
        counts = self.counts.take(rows.numpy(), axis=0).astype(np.float32)
        return torch.from_numpy(np.log1p(counts))

    def in_split(self, name: str) -> np.ndarray:
        """(E,) bool: which examples belong to split `name`."""
        return self.split == SPLITS.index(name)

    def split_names(self) -> np.ndarray:
        """(E,) str: each example's split by name."""
        return np.asarray(SPLITS)[self.split]


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


def _split_codes(values: pl.Series) -> np.ndarray:
    """(E,) uint8 index into SPLITS of each example's split."""
    values = values.cast(pl.String)
    unknown = sorted(map(str, set(values.unique().to_list()) - set(SPLITS)))
    if unknown:
        raise ValueError(f"unknown split values in the examples: {unknown}; expected {SPLITS}")
    codes = values.replace_strict(list(SPLITS), list(range(len(SPLITS))), return_dtype=pl.UInt8)
    return codes.to_numpy()


def _profiles(history: pl.DataFrame | None, path_types: Sequence[str], users: np.ndarray):
    """(len(users), T) L1-normalised history bag of path types; zeros for an empty history.
    Users are found by a sorted search, not a dict: a dict of 1M users costs ~100 MB."""
    uniq, inverse = np.unique(np.asarray(users, dtype=np.int64), return_inverse=True)
    out = np.zeros((len(uniq), len(path_types)), dtype=np.float64)
    if history is not None and history.height:
        w = history["weight"].cast(pl.Float64).to_numpy()
        assert np.isfinite(w).all() and (w >= 0).all(), "history weights must be finite and >= 0"
        wanted = history["user_idx"].to_numpy().astype(np.int64)
        at = np.searchsorted(uniq, wanted)
        keep = at < len(uniq)
        keep[keep] = uniq[at[keep]] == wanted[keep]
        codes = _type_codes(history["path_type"], path_types, "history")
        np.add.at(out, (at[keep], codes[keep]), w[keep])
    total = out.sum(axis=1, keepdims=True)
    out = np.divide(out, total, out=np.zeros_like(out), where=total > 0)
    return torch.from_numpy(out[inverse.reshape(-1)]).float()


def _candidates(examples: pl.DataFrame, width: int | None = None) -> PathGrid:
    """The candidate grid of the examples, without features (those are filled by _grid), with
    `width` columns (default: the longest list)."""
    ids = examples["example_id"].cast(pl.Int64).to_numpy()
    assert len(np.unique(ids)) == len(ids), "example_id must be unique"
    lengths = examples["candidate_item_idxs"].list.len().to_numpy().astype(np.int64)
    assert len(ids) > 0 and (lengths >= 1).all(), "every example needs >= 1 candidate"
    n, k = len(ids), int(lengths.max()) if width is None else width
    assert k >= lengths.max(), f"width {k} < the longest candidate list {lengths.max()}"
    row = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    cand = np.full((n, k), -1, dtype=np.int32)
    cand[row, pos] = examples["candidate_item_idxs"].explode().cast(pl.Int32).to_numpy()
    targets = examples["target_item_idx"].cast(pl.Int64).to_numpy()
    hit = cand == targets[:, None]  # (E, K)
    target = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    split = _split_codes(examples["split"])
    assert (target[split == SPLITS.index("train")] >= 0).all(), (
        "train examples must contain their target"
    )
    if "in_candidates" in examples.columns:
        flag = examples["in_candidates"].to_list()
        known = np.array([f is not None for f in flag])
        assert (np.array(flag)[known].astype(bool) == (target[known] >= 0)).all(), (
            "in_candidates disagrees with candidate_item_idxs"
        )
    users = torch.tensor(examples["user_idx"].to_numpy(), dtype=torch.long)
    assert bool((users >= 0).all()), "user_idx must be >= 0"
    mask, empty = torch.from_numpy(cand >= 0), torch.zeros((n, 0))
    counts = np.zeros((n, k, 0), dtype=np.uint8)
    target = torch.from_numpy(target)
    return PathGrid([], ids, split, cand, mask, users, target, counts, empty, users[:0], empty)


def _cells(g: PathGrid) -> pl.DataFrame:
    """(example_id, candidate_item_idx, r, p): every real candidate and its grid cell."""
    r, p = np.nonzero(g.cand >= 0)
    cand = g.cand[r, p].astype(np.int64)
    return pl.DataFrame({"example_id": g.example_id[r], "candidate_item_idx": cand, "r": r, "p": p})


def _count_dtype(largest: int) -> np.dtype:
    """The smallest unsigned type that holds `largest` (counts are exact): uint8 on the data
    seen so far (ml-100k's largest count is 56, Beauty-like 46)."""
    return np.promote_types(np.uint8, np.min_scalar_type(largest))


def _grid(
    examples: pl.DataFrame,
    pair_features: pl.DataFrame,
    history: pl.DataFrame | None,
    path_types: Sequence[str],
    width: int | None = None,
) -> PathGrid:
    """Candidates plus features. Pair features of candidates not in an example's list (or of
    absent examples) are ignored; duplicate (example, candidate, type) rows add up."""
    g = _candidates(examples, width)
    g.path_types = list(path_types)
    pf = pair_features.select(
        pl.col("example_id").cast(pl.Int64),
        pl.col("candidate_item_idx").cast(pl.Int64),
        "path_type",
        pl.col("n_paths").cast(pl.Int64),
    )
    codes = _type_codes(pf["path_type"], path_types, "pair_features")
    pf = pf.with_columns(code=pl.Series(codes, dtype=pl.Int64)).join(
        _cells(g), on=["example_id", "candidate_item_idx"]
    )
    assert (pf["n_paths"] >= 0).all(), "n_paths must be >= 0"
    cells = pf.group_by("r", "p", "code").agg(pl.col("n_paths").sum())
    largest = int(cells["n_paths"].max() or 0)
    g.counts = np.zeros((*g.cand.shape, len(path_types)), dtype=_count_dtype(largest))
    cell = (cells["r"].to_numpy(), cells["p"].to_numpy(), cells["code"].to_numpy())
    g.counts[cell] = cells["n_paths"].to_numpy()
    uniq, inverse = np.unique(g.users.numpy(), return_inverse=True)
    g.user_ids = torch.from_numpy(uniq)
    g.user_profile = _profiles(history, path_types, uniq)  # (U, T)
    g.profile = g.user_profile[torch.from_numpy(inverse)]  # (E, T)
    return g


def _in_splits(splits: Sequence[str] | None) -> pl.Expr:
    """Whether an example belongs to `splits` (None: every split)."""
    return pl.lit(True) if splits is None else pl.col("split").is_in(list(splits))


def _positions(examples: pl.DataFrame, splits: Sequence[str] | None) -> np.ndarray:
    """Ascending row positions of the examples of `splits` (None: every example)."""
    assert examples["example_id"].n_unique() == examples.height, "example_id must be unique"
    if splits is None:
        return np.arange(examples.height)
    return np.flatnonzero(examples.select(_in_splits(splits)).to_series().to_numpy())


def _user_rows(
    examples: pl.DataFrame,
    keep: np.ndarray,
    splits: Sequence[str] | None,
    users_per_batch: int,
) -> Iterator[tuple[pl.Series, np.ndarray, pl.DataFrame]]:
    """Each batch of users of `examples` (`user_batches`), with the ascending indices into
    `keep` (`_positions(examples, splits)`) of the kept examples of those users (empty for a
    user with none), and those examples, in the same order.

    The examples are selected by a filter rather than gathered by position: a frame read from
    Parquet comes in chunks (24 for 3M examples), and a gather from it copies the whole
    candidate-list column into one chunk first, 256 MB and 0.14 s a batch at 1M users
    (measured), where the filter costs 5 ms and the batch's rows."""
    users = examples["user_idx"].to_numpy()[keep]
    order = np.argsort(users, kind="stable")
    ordered = users[order]
    for batch in user_batches(examples, users_per_batch):
        low = np.searchsorted(ordered, batch.min(), side="left")
        high = np.searchsorted(ordered, batch.max(), side="right")
        rows = np.sort(order[low:high])
        mine = pl.col("user_idx").is_in(batch.cast(examples.schema["user_idx"]).implode())
        selected = examples.filter(mine & _in_splits(splits)) if len(rows) else examples.clear()
        assert selected.height == len(rows), "a batch's examples differ from its rows"
        yield batch, rows, selected


def _read_batch(
    examples: pl.DataFrame,
    folder: Path,
    users: pl.Series,
    path_types: Sequence[str],
    width: int,
) -> tuple[PathGrid, pl.DataFrame]:
    """`_grid` of `examples` (examples of `users` only) from those users' rows of kg_paths'
    tables, and their history profile rows."""
    history = read_users(folder / "history_profile.parquet", users, HISTORY_COLUMNS)
    features = read_users(folder / "pair_features.parquet", users, FEATURE_COLUMNS)
    return _grid(examples, features, history, path_types, width), history


def read_grid(
    examples: pl.DataFrame,
    folder: str | Path,
    path_types: Sequence[str],
    users_per_batch: int = USERS_PER_BATCH,
    splits: Sequence[str] | None = ("train", "val"),
) -> PathGrid:
    """The grid of the examples of `splits` from kg_paths' tables in `folder`, read a batch
    of users at a time: the rows of `_grid` on the whole frames, in `examples` order and as
    wide (K) as the longest list, so training on it gives the same numbers. Training never
    looks at the test split, and `preference_ranks` scores it, hence the default. The user
    profiles cover every user of `examples`, as the π statistics of `train_preference` do.
    """
    folder = Path(folder)
    keep = _positions(examples, splits)
    n, k, t = len(keep), int(examples["candidate_item_idxs"].list.len().max()), len(path_types)
    n_users = examples["user_idx"].n_unique()
    g = PathGrid(
        list(path_types),
        np.zeros(n, dtype=np.int64),
        np.zeros(n, dtype=np.uint8),
        np.zeros((n, 0), dtype=np.int32),  # 160 MB at 1M users that training never reads
        torch.zeros((n, k), dtype=torch.bool),
        torch.zeros(n, dtype=torch.long),
        torch.full((n,), -1, dtype=torch.long),
        np.zeros((n, k, t), dtype=np.uint8),
        torch.zeros((n, t)),
        torch.zeros(n_users, dtype=torch.long),
        torch.zeros((n_users, t)),
    )
    done = 0
    for users, rows, batch in _user_rows(examples, keep, splits, users_per_batch):
        ids = users.to_numpy().astype(np.int64)
        if len(rows):
            b, history = _read_batch(batch, folder, users, path_types, k)
            at = torch.from_numpy(rows)
            g.example_id[rows], g.split[rows] = b.example_id, b.split
            for mine, theirs in ((g.mask, b.mask), (g.users, b.users), (g.target, b.target)):
                mine[at] = theirs
            g.profile[at] = b.profile
            if b.counts.dtype.itemsize > g.counts.dtype.itemsize:
                g.counts = g.counts.astype(b.counts.dtype)
            g.counts[rows] = b.counts
        else:  # only examples outside `splits`: their profile still counts for π statistics
            history = read_users(folder / "history_profile.parquet", users, HISTORY_COLUMNS)
        g.user_ids[done : done + len(ids)] = torch.from_numpy(ids)
        g.user_profile[done : done + len(ids)] = _profiles(history, path_types, ids)
        done += len(ids)
    assert done == n_users, f"{done} users read of {n_users}"
    return g


def read_path_types(folder: str | Path) -> list[str]:
    """The path types of kg_paths' pair_features and history_profile, sorted: the vocabulary
    of the preference module. Streamed: the column alone is GBs at 1M users."""
    found: set[str] = set()
    for name in ("pair_features", "history_profile"):
        scan = pl.scan_parquet(Path(folder) / f"{name}.parquet").select(pl.col("path_type"))
        found |= set(scan.unique().collect(engine="streaming")["path_type"].to_list())
    return sorted(found)


def _chunks(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`rows` in near-equal chunks of at most CHUNK_ROWS. Equal, not CHUNK_ROWS and a
    remainder: the history encoder's matmul rounds differently for fewer than 12 rows (MKL's
    small-M kernels, measured), so a tiny last chunk would change the last bit of its scores.
    """
    return rows.tensor_split(max(1, -(-len(rows) // CHUNK_ROWS)))


def _forward(model: PreferenceModel, g: PathGrid, rows: torch.Tensor):
    # index_select, not g.users[rows]: advanced indexing is ~100x slower on a busy 2-core CPU
    users, profile, mask = (x.index_select(0, rows) for x in (g.users, g.profile, g.mask))
    return model(users, profile, g.feats(rows), mask)


@torch.no_grad()
def _scores(model: PreferenceModel, g: PathGrid, rows: torch.Tensor) -> torch.Tensor:
    """(N, K) scores of grid rows, a chunk at a time; each row's are those of any batch."""
    return torch.cat([_forward(model, g, chunk)[0] for chunk in _chunks(rows)])


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


def _mean_nll(log_prob: torch.Tensor) -> float:
    """F.cross_entropy (mean) from the targets' log-probabilities (N, 1). nll_loss adds them
    up in an order set by N alone, so log-probabilities gathered a chunk at a time give the
    loss of one pass over the (N, K) scores, bit for bit."""
    if not len(log_prob):
        return math.nan
    return float(F.nll_loss(log_prob, torch.zeros(len(log_prob), dtype=torch.long)))


@torch.no_grad()
def _target_log_probs(
    model: PreferenceModel, g: PathGrid, rows: torch.Tensor, with_ranks: bool
) -> tuple[torch.Tensor, np.ndarray]:
    """(N, 1) log-probability of each row's target and (N,) its rank (if asked), by chunk."""
    log_probs, ranks = [torch.zeros((0, 1))], [np.zeros(0)]
    for chunk in _chunks(rows):
        scores, _ = _forward(model, g, chunk)  # (C, K)
        target = g.target.index_select(0, chunk)
        log_probs.append(F.log_softmax(scores, dim=1).gather(1, target[:, None]))
        if with_ranks:
            ranks.append(_ranks(scores, target))
    return torch.cat(log_probs), np.concatenate(ranks)


@torch.no_grad()
def _epoch_log(model: PreferenceModel, g: PathGrid, train: torch.Tensor, val: torch.Tensor):
    train_log_probs, _ = _target_log_probs(model, g, train, with_ranks=False)
    val_log_probs, val_ranks = _target_log_probs(model, g, val, with_ranks=True)
    log = {"loss": _mean_nll(train_log_probs), "val_loss": _mean_nll(val_log_probs)}
    if len(val):
        metrics = ranking_metrics(val_ranks, ks=(1, 5, 10))
        log |= {f"val_{name}": value for name, value in metrics.items()}
    return log


@torch.no_grad()
def _pi_stats(model: PreferenceModel, users: torch.Tensor, profile: torch.Tensor):
    """Mean KL(π_u ‖ uniform) and total-variation distance to uniform, over the given users."""
    kl, tv = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.float64)]
    for u, p in zip(_chunks(users), _chunks(profile)):  # per user, a chunk at a time
        pi = model.logits(u, p).softmax(dim=-1).double()  # (C, T)
        t = pi.shape[1]
        kl.append((pi * (pi * t).clamp_min(1e-300).log()).sum(dim=1))
        tv.append(0.5 * (pi - 1.0 / t).abs().sum(dim=1))
    return float(torch.cat(kl).mean()), float(torch.cat(tv).mean())


@torch.no_grad()
def _idf(g: PathGrid, train: torch.Tensor) -> torch.Tensor:
    """(T,) idf_t over the training (example, candidate) pairs, counted a chunk at a time."""
    present = torch.zeros(len(g.path_types), dtype=torch.long)  # pairs with >= 1 path of t
    n_pairs = 0
    for rows in _chunks(train):
        mask = g.mask.index_select(0, rows).numpy()  # (C, K)
        has = (g.counts.take(rows.numpy(), axis=0) > 0) & mask[..., None]  # (C, K, T)
        present += torch.from_numpy(has.sum(axis=(0, 1), dtype=np.int64))
        n_pairs += int(mask.sum())
    return torch.log((1 + float(n_pairs)) / (1 + present.float())) + 1


def _train_epoch(
    model: PreferenceModel,
    opts: Sequence[torch.optim.Optimizer],
    g: PathGrid,
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
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
    model.eval()


def _optimizers(model: PreferenceModel, config: PreferenceConfig) -> list[torch.optim.Optimizer]:
    """AdamW for the weights every step uses; for the user_id table, lazy Adam on the rows a
    step touched.

    Dense AdamW on an (n_users, T) table updates every row on every step, and an epoch has
    n_users / batch steps, so the encoder cost grew as users² (20 ms a step at 1M users: 24 min
    of the stage there; benchmarks/AFTER_PATHS.md). `SparseAdam` updates a batch's rows only.
    It has no weight decay, so a user_id config with `weight_decay` > 0 keeps dense AdamW.
    """
    weights = [model.type_weight_raw]
    if getattr(model.encoder, "sparse", False):  # the user_id table (PreferenceModel)
        return [
            torch.optim.SparseAdam(list(model.encoder.parameters()), lr=config.lr),
            torch.optim.AdamW(weights, lr=config.lr, weight_decay=0.0),
        ]
    groups = [
        {"params": model.encoder.parameters(), "weight_decay": config.weight_decay},
        {"params": weights, "weight_decay": 0.0},
    ]
    return [torch.optim.AdamW(groups, lr=config.lr)]


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
    grid = _grid(examples, pair_features, history, path_types)
    return train_on_grid(grid, n_users, config, on_log)


def train_on_grid(
    g: PathGrid,
    n_users: int,
    config: PreferenceConfig = PreferenceConfig(),
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> PreferenceResult:
    """`train_preference` on a grid already built, e.g. by `read_grid` from kg_paths' files."""
    train = torch.from_numpy(np.flatnonzero(g.in_split("train")))
    val = torch.from_numpy(np.flatnonzero(g.in_split("val") & (g.target.numpy() >= 0)))
    assert len(train), "no train examples"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = PreferenceModel(config, g.path_types, n_users)
    model.idf.copy_(_idf(g, train))
    opts = _optimizers(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    users, profiles = g.user_ids, g.user_profile
    kl_init, tv_init = _pi_stats(model, users, profiles)
    metric = f"val_{SELECT_METRIC}"

    def key(entry: dict[str, float]) -> tuple[float, ...]:
        return (entry[metric], -entry["val_loss"]) if len(val) else (-entry["loss"],)

    log: list[dict[str, float]] = []
    best: dict[str, float] = {}
    best_state: dict[str, torch.Tensor] = {}
    for epoch in range(config.epochs + 1):  # epoch 0 only logs the untrained model
        if epoch:
            _train_epoch(model, opts, g, train, config, gen)
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
    grid = _grid(examples, pair_features, history, path_types)
    return choose_encoder_on_grid(grid, n_users, config, on_log)


def choose_encoder_on_grid(
    g: PathGrid,
    n_users: int,
    config: PreferenceConfig = PreferenceConfig(),
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> EncoderChoice:
    """`choose_encoder` on a grid already built: both encoders train on the one grid."""
    results = {
        name: train_on_grid(g, n_users, dataclasses.replace(config, user_encoder=name), on_log)
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
    scores = _scores(model, g, torch.arange(len(g.example_id)))  # (E, K)
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
            "split": g.split_names(),
            "rank": _ranks(torch.from_numpy(matrix), g.target),
        }
    )


@torch.no_grad()
def preference_ranks(
    model: PreferenceModel,
    examples: pl.DataFrame,
    folder: str | Path,
    users_per_batch: int = USERS_PER_BATCH,
    splits: Sequence[str] | None = None,
) -> pl.DataFrame:
    """(example_id, split, rank) of the examples of `splits` (None: all), in `examples` order:
    `example_ranks` of `score_examples` on the whole tables of kg_paths' `folder`, scored a
    batch of users at a time, without a row per candidate (60M at 1M users)."""
    folder = Path(folder)
    keep = _positions(examples, splits)
    width = int(examples["candidate_item_idxs"].list.len().max()) if examples.height else 0
    ranks = np.full(len(keep), np.inf)
    model.eval()
    for users, rows, batch in _user_rows(examples, keep, splits, users_per_batch):
        if not len(rows):
            continue
        g, _ = _read_batch(batch, folder, users, model.path_types, width)
        everything = torch.arange(len(rows))
        ranks[rows] = np.concatenate(
            [
                _ranks(_forward(model, g, chunk)[0], g.target.index_select(0, chunk))
                for chunk in _chunks(everything)
            ]
        )
    return pl.DataFrame(
        {
            "example_id": examples["example_id"].cast(pl.Int64).gather(keep),
            "split": examples["split"].gather(keep),
            "rank": ranks,
        }
    )


def retriever_ranks(examples: pl.DataFrame, splits: Sequence[str] | None = None) -> pl.DataFrame:
    """(example_id, split, rank) of the examples of `splits` (None: all) under the order of
    their own candidate lists (the retriever's, for val/test): the target's position + 1, inf
    if absent. What `example_ranks` makes of scores falling along each list, by chunks."""
    keep = _positions(examples, splits)
    ranks = [np.zeros(0)]
    for start in range(0, examples.height, CHUNK_ROWS):  # slices: no copy (`_user_rows`)
        chunk = examples.slice(start, CHUNK_ROWS).filter(_in_splits(splits))
        if chunk.height:
            target = _candidates(chunk).target.numpy()
            ranks.append(np.where(target >= 0, target + 1.0, np.inf))
    return pl.DataFrame(
        {
            "example_id": examples["example_id"].cast(pl.Int64).gather(keep),
            "split": examples["split"].gather(keep),
            "rank": np.concatenate(ranks),
        }
    )


def evaluate_rankings(
    examples: pl.DataFrame, scores: pl.DataFrame, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {"subset" | "overall": metrics + n_examples}} for val and test.

    Ranks as in `example_ranks`; an example whose target is not a candidate is a miss and only
    counts in "overall". An empty population gets NaN metrics.
    """
    return rank_metrics(example_ranks(examples, scores), ks)


def rank_metrics(
    ranked: pl.DataFrame, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, dict[str, float]]]:
    """`evaluate_rankings` from (example_id, split, rank) rows: `example_ranks`,
    `preference_ranks` or `retriever_ranks`. Means follow the rows' order, so rows in
    `examples` order give evaluate_rankings' numbers exactly."""
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
            "path_type": pl.Series(model.path_types).gather(np.tile(np.arange(t), len(ids))),
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


@dataclass
class FittedPreferences:
    """What the `preference_model` stage produces (`fit_preferences`)."""

    result: PreferenceResult  # of the chosen encoder
    encoder: str
    val_ndcg10_by_encoder: dict[str, float]
    path_types: list[str]
    report: dict  # {"preference" | "retriever order": evaluate_rankings' dict} on val/test
    preferences: pl.DataFrame  # user_preferences of every user


def fit_preferences(
    candidates: pl.DataFrame,
    folder: str | Path,
    user_encoder: Literal["auto", "user_id", "history"] = "auto",
    config: PreferenceConfig = PreferenceConfig(),
    users_per_batch: int = USERS_PER_BATCH,
) -> FittedPreferences:
    """The preference module from kg_paths' tables in `folder`, in memory bounded by the
    train/val grid: the tables are read a batch of users at a time (102M pair rows at 1M
    Beauty-like users), once into the grid the encoder(s) train on, once more to score val and
    test. `auto` trains both encoders and keeps the better on val."""
    folder = Path(folder)
    path_types = read_path_types(folder)
    n_users = int(candidates["user_idx"].max()) + 1
    grid = read_grid(candidates, folder, path_types, users_per_batch)
    if user_encoder == "auto":
        choice = choose_encoder_on_grid(grid, n_users, config)
        result, encoder, by_encoder = choice.best, choice.encoder, choice.val_ndcg10
    else:
        result = train_on_grid(
            grid, n_users, dataclasses.replace(config, user_encoder=user_encoder)
        )
        encoder, by_encoder = user_encoder, {user_encoder: result.best_val_ndcg10}
    del grid
    evaluated = ("val", "test")
    ranked = preference_ranks(result.model, candidates, folder, users_per_batch, evaluated)
    report = {
        "preference": rank_metrics(ranked),
        "retriever order": rank_metrics(retriever_ranks(candidates, evaluated)),
    }
    history = pl.read_parquet(folder / "history_profile.parquet")  # (user, type): small
    preferences = user_preferences(result.model, None, history)
    return FittedPreferences(result, encoder, by_encoder, path_types, report, preferences)
