"""Ranks and metrics of ranking examples under the preference module's scores, or under the
retriever's order (the baseline it is compared with).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch

from lkg_pipeline.core.evaluate.metrics import rank_of_target, ranking_metrics
from lkg_pipeline.core.paths.preference.grid import (
    CHUNK_ROWS,
    USERS_PER_BATCH,
    candidate_grid,
    grid_cells,
    in_splits,
    path_grid,
    read_user_batch,
    row_chunks,
    rows_by_user,
    split_positions,
)
from lkg_pipeline.core.paths.preference.model import PreferenceModel, forward_rows, score_rows


def grid_ranks(scores: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """1-based target ranks; ties go to the earlier candidate (= retriever order for val/test,
    so a user without any path keeps the retriever's ranking); absent target → inf."""
    ranks = np.full(len(target), np.inf)
    present = target >= 0
    if present.any():
        found = rank_of_target(scores[present], target[present], tie_break="index")
        ranks[present.numpy()] = found.numpy().astype(np.float64)
    return ranks


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
    g = path_grid(examples, pair_features, history, model.path_types)
    model.eval()
    scores = score_rows(model, g, torch.arange(len(g.example_id)))  # (E, K)
    m = g.mask.numpy()
    return pl.DataFrame(
        {
            "example_id": np.repeat(g.example_id, m.sum(axis=1)),
            "candidate_item_idx": g.cand[m],
            "score": scores.numpy()[m],
        },
        schema={"example_id": pl.Int64, "candidate_item_idx": pl.Int32, "score": pl.Float32},
    )


def preference_scores(
    model: PreferenceModel, examples: pl.DataFrame, pair_features: pl.DataFrame, folder: str | Path
) -> pl.DataFrame:
    """`score_examples` for examples of any split (serving's are `next`), with their users'
    history profile read from kg_paths' `folder`."""
    history = pl.read_parquet(Path(folder) / "history_profile.parquet").join(
        examples.select("user_idx").unique(), on="user_idx", how="semi"
    )
    # The model knows the splits train/val/test only; a split does not change a score.
    as_test = examples.with_columns(split=pl.lit("test"))
    return score_examples(model, as_test, pair_features, history)


def example_ranks(examples: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """(example_id, split, rank) for each example: the target's 1-based rank under `scores`.

    Ties go to the earlier candidate in candidate_item_idxs (a stable descending sort); an
    example whose target is not a candidate gets rank inf.
    """
    g = candidate_grid(examples)
    cells = grid_cells(g)
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
            "rank": grid_ranks(torch.from_numpy(matrix), g.target),
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
    keep = split_positions(examples, splits)
    width = int(examples["candidate_item_idxs"].list.len().max()) if examples.height else 0
    ranks = np.full(len(keep), np.inf)
    model.eval()
    for users, rows, batch in rows_by_user(examples, keep, splits, users_per_batch):
        if not len(rows):
            continue
        g, _ = read_user_batch(batch, folder, users, model.path_types, width)
        everything = torch.arange(len(rows))
        ranks[rows] = np.concatenate(
            [
                grid_ranks(forward_rows(model, g, chunk)[0], g.target.index_select(0, chunk))
                for chunk in row_chunks(everything)
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
    keep = split_positions(examples, splits)
    ranks = [np.zeros(0)]
    for start in range(0, examples.height, CHUNK_ROWS):  # slices: no copy (`rows_by_user`)
        chunk = examples.slice(start, CHUNK_ROWS).filter(in_splits(splits))
        if chunk.height:
            target = candidate_grid(chunk).target.numpy()
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
