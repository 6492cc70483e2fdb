"""Summaries of enumerated paths and learned preferences, read without holding a whole table."""

from pathlib import Path

import polars as pl

SAMPLE_COLUMNS = ("example_id", "history_item_idx", "candidate_item_idx", "path_type", "via_name")


def paths_by_type(pair_features: Path) -> pl.DataFrame:
    """Pairs and paths per path type, streamed: which relations the graph's paths run through."""
    return (
        pl.scan_parquet(pair_features)
        .group_by("path_type")
        .agg(pairs=pl.len(), paths=pl.col("n_paths").sum())
        .sort("paths", descending=True)
        .collect(engine="streaming")
    )


def path_sample(paths: Path, n: int = 10) -> pl.DataFrame:
    """The first `n` concrete paths (the largest table only lends its head): what they look like."""
    return pl.scan_parquet(paths).head(n).collect().select(SAMPLE_COLUMNS)


def mean_preference_by_type(preferences: pl.DataFrame) -> pl.DataFrame:
    """Mean learned weight per path type, highest first: which relations users lean on."""
    return (
        preferences.group_by("path_type")
        .agg(mean_pi=pl.col("pi").mean())
        .sort("mean_pi", descending=True)
    )
