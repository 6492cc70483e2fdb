"""Training the preference module by gradient descent: epochs over the grid, validation that keeps
the best epoch, the choice of user encoder, and `fit_preferences`, what the preference stage runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from torch.nn import functional as F

from lkg_pipeline.core.evaluate.metrics import ranking_metrics
from lkg_pipeline.core.io.storage import write_parquet_atomic
from lkg_pipeline.core.paths.preference.grid import (
    USERS_PER_BATCH,
    PathGrid,
    path_grid,
    read_grid,
    read_path_types,
    row_chunks,
)
from lkg_pipeline.core.paths.preference.model import (
    ENCODERS,
    PreferenceConfig,
    PreferenceModel,
    PreferenceResult,
    forward_rows,
    save_preference,
    user_preferences,
)
from lkg_pipeline.core.paths.preference.ranking import (
    grid_ranks,
    preference_ranks,
    rank_metrics,
    retriever_ranks,
)

SELECT_METRIC = "NDCG@10"  # validation metric (subset population) that picks the best epoch


def _loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(scores, target) if len(target) else torch.tensor(math.nan)


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
    for chunk in row_chunks(rows):
        scores, _ = forward_rows(model, g, chunk)  # (C, K)
        target = g.target.index_select(0, chunk)
        log_probs.append(F.log_softmax(scores, dim=1).gather(1, target[:, None]))
        if with_ranks:
            ranks.append(grid_ranks(scores, target))
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
    for u, p in zip(row_chunks(users), row_chunks(profile)):  # per user, a chunk at a time
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
    for rows in row_chunks(train):
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
        scores, logits = forward_rows(model, g, rows)  # (B, K), (B, T)
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
    of the stage there; benchmarks/paths/AFTER_PATHS.md). `SparseAdam` updates a batch's rows only.
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
    grid = path_grid(examples, pair_features, history, path_types)
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
    grid = path_grid(examples, pair_features, history, path_types)
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


def save_fitted(fitted: FittedPreferences, dataset: str, folder: Path) -> None:
    """Model, training record and preferences in one folder, so that they are replaced together."""
    result = fitted.result
    save_preference(result, result.model.config, fitted.path_types, folder)
    (folder / "training.json").write_text(
        json.dumps(
            {
                "dataset": dataset,
                "encoder": fitted.encoder,
                "val_ndcg10_by_encoder": fitted.val_ndcg10_by_encoder,
                "best_epoch": result.best_epoch,
                "pi_shift": result.pi_shift,
                "history": result.loss_history,
                "metrics": fitted.report,
            },
            indent=2,
            default=float,
        )
    )
    write_parquet_atomic(fitted.preferences, folder / "preferences.parquet")
