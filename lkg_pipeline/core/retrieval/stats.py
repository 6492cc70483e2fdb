"""What a candidate table says about the retriever: how often the true item made the list."""

import polars as pl


def coverage_by_split(table: pl.DataFrame) -> pl.DataFrame:
    """Share of val/test examples whose true item is a candidate: the ranker's ceiling."""
    return (
        table.filter(pl.col("split") != "train")
        .group_by("split")
        .agg(users=pl.len(), coverage=pl.col("in_candidates").mean())
        .sort("split")
    )


def train_retrieved(table: pl.DataFrame, k: int) -> float | None:
    """Share of train examples whose true item the retriever ranked in its top k; None when
    no train example has a retriever rank (no train examples, or candidates drawn at random):
    0.0 would read as a retriever that never finds the target."""
    ranks = table.filter(pl.col("split") == "train")["target_rank"].drop_nulls()
    return float((ranks <= k).mean()) if ranks.len() else None
