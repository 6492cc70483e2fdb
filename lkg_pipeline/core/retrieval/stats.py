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


def train_retrieved(table: pl.DataFrame, k: int) -> float:
    """Share of train examples whose true item the retriever ranked in its top k (0 if none)."""
    return float(
        table.filter(pl.col("split") == "train").select((pl.col("target_rank") <= k).mean()).item()
        or 0.0
    )
