"""The stages after `kg_paths` hold a batch of users at a time: how users are cut into batches,
and how a batch's rows are read from a table that `write_paths` wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl


def user_batches(examples: pl.DataFrame, users_per_batch: int) -> list[pl.Series]:
    """The users of `examples` in ascending order, cut into batches. By user, not by example:
    a user's history profile needs all of their training examples in one batch."""
    if users_per_batch < 1:
        raise ValueError(f"users_per_batch={users_per_batch} must be ≥ 1")
    users = examples["user_idx"].unique().sort()
    return [users.slice(i, users_per_batch) for i in range(0, users.len(), users_per_batch)]


def bounded_user_batches(
    rows_per_user: pl.DataFrame, users_per_batch: int, rows_per_batch: int | None
) -> list[pl.Series]:
    """Users of `rows_per_user` (user_idx, rows) ascending, cut where a batch would pass
    `users_per_batch` users or `rows_per_batch` rows (a user with more rows than that is a batch
    alone). A row budget is what bounds a stage's memory: a user count alone lets the batch
    grow with the graph's density (2,500 Beauty-like users hold 1.4M paths, 2,500 ml-100k-like
    ones ~9M)."""
    if users_per_batch < 1:
        raise ValueError(f"users_per_batch={users_per_batch} must be ≥ 1")
    if rows_per_batch is not None and rows_per_batch < 1:
        raise ValueError(f"rows_per_batch={rows_per_batch} must be ≥ 1 (or None: no row budget)")
    ordered = rows_per_user.sort("user_idx")
    users, rows = ordered["user_idx"], ordered["rows"].to_numpy()
    # A greedy cut has to be sequential (each cut depends on where the last one fell); one pass
    # over the counts takes 0.2 s at 1M users.
    starts, held, count = [0], 0, 0
    for i, n in enumerate(rows.tolist()):
        if count and (count == users_per_batch or (rows_per_batch and held + n > rows_per_batch)):
            starts.append(i)
            held = count = 0
        held, count = held + n, count + 1
    ends = starts[1:] + [users.len()]
    return [users.slice(a, b - a) for a, b in zip(starts, ends) if b > a]


def rows_per_user(file: Path, users: pl.Series) -> pl.DataFrame:
    """(user_idx, rows): how many rows each of `users` has in a Parquet table with a `user_idx`
    column (0 for none), from that one column, streamed."""
    counts = (
        pl.scan_parquet(file).group_by("user_idx").agg(rows=pl.len()).collect(engine="streaming")
    )
    return (
        pl.DataFrame({"user_idx": users.unique()})
        .join(counts.with_columns(pl.col("user_idx").cast(users.dtype)), on="user_idx", how="left")
        .with_columns(pl.col("rows").fill_null(0))
    )


def read_users(
    source: Path | pl.LazyFrame, users: pl.Series, columns: Sequence[str] | None = None
) -> pl.DataFrame:
    """The rows of `users` in a Parquet table with a `user_idx` column (a file, or a scan of
    one), in file order.

    What keeps the stages after `kg_paths` within a batch's memory: `write_paths` writes each
    batch of users as its own row groups, users ascending, so the row-group statistics of
    `user_idx` let the scan skip every row group outside [min, max] of the batch and a batch
    reads about its own share of the file, whatever batch size the reader uses.
    """
    scan = pl.scan_parquet(source) if isinstance(source, Path) else source
    if "user_idx" not in scan.collect_schema():
        raise ValueError(
            f"{source} has no user_idx column: it was written before the tables after kg_paths "
            "were read a batch of users at a time; re-materialise kg_paths"
        )
    if users.len():
        low, high = users.min(), users.max()
        scan = scan.filter(pl.col("user_idx").is_between(low, high))
    scan = scan.filter(pl.col("user_idx").is_in(users.cast(pl.Int32).implode()))
    return (scan if columns is None else scan.select(columns)).collect()
