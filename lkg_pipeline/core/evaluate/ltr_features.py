"""The learned reranker's features (`ltr`), one row per (example, candidate): what the
retriever thought (score, rank, distance to the top and to the list's mean), how popular the
item is overall and next to the user's history, how the KG links the history to it (path counts
per relation type), and, when given, the preference module's and the LLM's scores.

Recency: kg_paths' `pair_features` table holds, per (example, candidate, path type), the count
of paths from all of the example's last `PathConfig.history_len` history items, without the
history item they start from, so the counts cannot be weighted by its recency: the path
features here are plain counts. (Only `paths.parquet` knows the history position, and it keeps
at most `max_paths_per_pair` paths per item pair: enough to say which history items reach a
candidate, not how many paths of each type they have.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from lkg_pipeline.core.paths.preference.grid import FEATURE_COLUMNS

# What identifies a row of the feature table; every other column is a feature.
ID_COLUMNS = ("example_id", "user_idx", "split", "position", "candidate_item_idx", "label")
CANDIDATE_COLUMNS = (
    "example_id", "user_idx", "split", "prefix_len", "target_item_idx",
    "candidate_item_idxs", "candidate_scores",
)  # fmt: skip
PATH_PREFIX = "paths_"  # one feature column per path type: paths_directed_by, ...
KEYS = ["example_id", "candidate_item_idx"]


def require_columns(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks the columns {missing}; it has {frame.columns}")


def read_pair_features(folder: str | Path, example_ids: pl.Series) -> pl.DataFrame:
    """(example_id, candidate_item_idx, path_type, n_paths) of `example_ids` from kg_paths'
    `folder/pair_features.parquet`, streamed: the file holds every train prefix too (102M
    rows at 1M Beauty-like users), and only the rows kept are ever in memory."""
    wanted = example_ids.cast(pl.Int64).implode()
    return (
        pl.scan_parquet(Path(folder) / "pair_features.parquet")
        .select(FEATURE_COLUMNS)
        .filter(pl.col("example_id").cast(pl.Int64).is_in(wanted))
        .collect(engine="streaming")
    )


def _candidate_rows(candidates: pl.DataFrame) -> pl.DataFrame:
    """One row per (example, candidate) with its position, label and retriever score."""
    require_columns(candidates, CANDIDATE_COLUMNS, "candidates")
    if candidates["example_id"].n_unique() != candidates.height:
        raise ValueError("candidates: example_id must be unique")
    items, scores = pl.col("candidate_item_idxs"), pl.col("candidate_scores")
    bad = candidates.filter(
        scores.is_null() | (items.list.len() == 0) | (scores.list.len() != items.list.len())
    )
    if bad.height:
        raise ValueError(
            f"{bad.height} examples (splits {sorted(bad['split'].unique().to_list())}) lack a "
            "retriever score per candidate; train examples have none (and shuffled lists): "
            "pass val/test/next examples"
        )
    rows = (
        candidates.select(
            pl.col("example_id").cast(pl.Int64),
            pl.col("user_idx").cast(pl.Int32),
            pl.col("split").cast(pl.String),
            pl.col("prefix_len").cast(pl.Int32),
            pl.col("target_item_idx").cast(pl.Int32),
            items.cast(pl.List(pl.Int32)).alias("candidate_item_idx"),
            scores.cast(pl.List(pl.Float64)).alias("retriever_score"),
            pl.int_ranges(items.list.len(), dtype=pl.Int32).alias("position"),
        )
        .explode("candidate_item_idx", "retriever_score", "position")
        .sort("example_id", "position")
    )
    if rows["retriever_score"].null_count() or rows["retriever_score"].is_nan().any():
        raise ValueError("candidates: a retriever score is null or NaN")
    is_target = pl.col("candidate_item_idx") == pl.col("target_item_idx")
    return rows.with_columns(label=is_target.fill_null(False).cast(pl.Int8)).drop("target_item_idx")


def _retriever_features() -> list[pl.Expr]:
    """What the retriever thought, made comparable across examples: raw scores drift from user
    to user, the gap to the top and to the list's mean say how confident it was here."""
    s = pl.col("retriever_score")
    return [
        # rows are in (example, position) order, so "ordinal" gives ties to the earlier
        # candidate; on val/test lists (retriever order) this is position + 1
        (-s).rank("ordinal").over("example_id").cast(pl.Float64).alias("retriever_rank"),
        (s.max().over("example_id") - s).alias("score_margin"),
        (s - s.mean().over("example_id")).alias("score_vs_mean"),
    ]


def _popularity_features(
    rows: pl.DataFrame, sequences: pl.DataFrame, item_popularity: pl.DataFrame
) -> pl.DataFrame:
    """log1p(train interactions) of the candidate, and that minus the mean over the example's
    input history (its user's first `prefix_len` items): the retriever's popularity prior is
    one for everybody, while users differ in how far from the mainstream they go."""
    require_columns(item_popularity, ["item_idx", "n_train_interactions"], "item_popularity")
    pop = item_popularity.select(
        pl.col("item_idx").cast(pl.Int32),
        pl.col("n_train_interactions").cast(pl.Float64).log1p().alias("log_popularity"),
    )
    if pop["item_idx"].n_unique() != pop.height:
        raise ValueError("item_popularity: item_idx must be unique")
    examples = rows.select("example_id", "user_idx", "prefix_len").unique("example_id")
    history = (
        examples.join(
            sequences.select(pl.col("user_idx", "position", "item_idx").cast(pl.Int32)),
            on="user_idx",
        )
        .filter(pl.col("position") < pl.col("prefix_len"))
        .join(pop, on="item_idx", how="left")
        .group_by("example_id")
        .agg(history_log_popularity=pl.col("log_popularity").mean())
    )
    out = rows.join(
        pop.rename({"item_idx": "candidate_item_idx"}), on="candidate_item_idx", how="left"
    ).join(history, on="example_id", how="left")
    if out["log_popularity"].null_count():
        raise ValueError("item_popularity lacks some candidate items: pass the items table")
    gap = pl.col("log_popularity") - pl.col("history_log_popularity")
    return out.with_columns(
        popularity_gap=gap.fill_null(np.nan),  # NaN (LightGBM's missing) for an empty history
        history_len=pl.col("prefix_len").cast(pl.Float64),
    )


def _path_features(
    rows: pl.DataFrame, pair_features: pl.DataFrame, path_types: Sequence[str] | None
) -> tuple[pl.DataFrame, list[str]]:
    """Per path type the number of KG paths from the history to the candidate (0 where none),
    and their total. Pair rows of other examples or candidates are ignored; duplicates add."""
    require_columns(pair_features, FEATURE_COLUMNS, "pair_features")
    pf = pair_features.select(
        pl.col("example_id").cast(pl.Int64),
        pl.col("candidate_item_idx").cast(pl.Int32),
        pl.col("path_type").cast(pl.String),
        pl.col("n_paths").cast(pl.Int64),
    ).join(rows.select(KEYS).unique(), on=KEYS, how="semi")
    found = sorted(pf["path_type"].unique().to_list())
    types = found if path_types is None else list(path_types)
    unknown = sorted(set(found) - set(types))
    if unknown:
        raise ValueError(f"pair_features has path types {unknown} outside path_types {types}")
    columns = [f"{PATH_PREFIX}{t}" for t in types]
    kind = pl.col("path_type")
    counts = pf.group_by(KEYS).agg(
        pl.col("n_paths").filter(kind == t).sum().alias(c) for t, c in zip(types, columns)
    )
    out = rows.join(counts, on=KEYS, how="left").with_columns(
        pl.col(columns).fill_null(0).cast(pl.Float64)
    )
    total = pl.sum_horizontal(columns) if columns else pl.lit(0.0)
    return out.with_columns(total.cast(pl.Float64).alias(f"{PATH_PREFIX}total")), columns


def _join_scores(rows: pl.DataFrame, scores: pl.DataFrame, column: str, name: str) -> pl.DataFrame:
    """`scores`' `column` as the feature `name`; every candidate must have exactly one."""
    require_columns(scores, [*KEYS, column], name)
    scores = scores.select(
        pl.col("example_id").cast(pl.Int64),
        pl.col("candidate_item_idx").cast(pl.Int32),
        pl.col(column).cast(pl.Float64).alias(name),
    )
    if scores.select(KEYS).is_duplicated().any():
        raise ValueError(f"{name}: more than one score for an (example_id, candidate_item_idx)")
    out = rows.join(scores, on=KEYS, how="left")
    if out[name].null_count():
        raise ValueError(
            f"{name}: {out[name].null_count()} of {out.height} candidates have no score; "
            "restrict the candidates to the examples that were scored"
        )
    return out


def feature_table(
    candidates: pl.DataFrame,
    sequences: pl.DataFrame,
    pair_features: pl.DataFrame,
    item_popularity: pl.DataFrame,
    preference_scores: pl.DataFrame | None = None,
    llm_scores: pl.DataFrame | None = None,
    path_types: Sequence[str] | None = None,
) -> pl.DataFrame:
    """One row per (example, candidate) of `candidates` (val/test/next rows of the candidates
    table: lists in retriever order, with the retriever's scores), sorted by example_id and
    position: the ID_COLUMNS (label 1 = the true item) then Float64 features:

    retriever_score, retriever_rank (1-based, ties to the earlier candidate), score_margin
    (top score − score), score_vs_mean (score − the list's mean), log_popularity
    (log1p train interactions), popularity_gap (that − its mean over the input history),
    history_len (prefix_len), paths_<type> for each path type, paths_total, then
    preference_score and llm_score when given.

    `sequences`: the prepare stage's table. `pair_features`: (example_id,
    candidate_item_idx, path_type, n_paths), as `read_pair_features` reads it. `item_popularity`:
    the items table (item_idx, n_train_interactions). `preference_scores`: (example_id,
    candidate_item_idx, score), as `preference_ranking.score_examples` makes it; `llm_scores`:
    the same keys with `llm_score`. `path_types`: the vocabulary of the path columns (default:
    the types present); pass `preference_grid.read_path_types(folder)` so that tables built
    apart (val/test to fit, `next` to serve) have the same columns.
    """
    rows = _candidate_rows(candidates)
    rows = rows.with_columns(_retriever_features())
    rows = _popularity_features(rows, sequences, item_popularity)
    rows, path_columns = _path_features(rows, pair_features, path_types)
    columns = [
        "retriever_score", "retriever_rank", "score_margin", "score_vs_mean",
        "log_popularity", "popularity_gap", "history_len", *path_columns, f"{PATH_PREFIX}total",
    ]  # fmt: skip
    if preference_scores is not None:
        rows = _join_scores(rows, preference_scores, "score", "preference_score")
        columns.append("preference_score")
    if llm_scores is not None:
        rows = _join_scores(rows, llm_scores, "llm_score", "llm_score")
        columns.append("llm_score")
    return rows.select(*ID_COLUMNS, *columns).sort("example_id", "position")


def feature_names(features: pl.DataFrame, exclude: Sequence[str] = ()) -> list[str]:
    """The feature columns of a `feature_table`, in order, less `exclude` (e.g. `llm_score`
    for the `ltr` row when the table serves `ltr+llm` too)."""
    names = [c for c in features.columns if c not in ID_COLUMNS]
    unknown = sorted(set(exclude) - set(names))
    if unknown:
        raise ValueError(f"exclude names {unknown}, which are not features of {names}")
    return [c for c in names if c not in exclude]


def llm_scores(ranked: pl.DataFrame) -> pl.DataFrame:
    """(example_id, candidate_item_idx, llm_score) from a rank_llm table (`rankings`, or the
    LLM's ranking of serving prompts): the `llm_scores` input of `feature_table`."""
    return ranked.select(
        "example_id", candidate_item_idx="ranked_item_idxs", llm_score="ranked_scores"
    ).explode("candidate_item_idx", "llm_score")
