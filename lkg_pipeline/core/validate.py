"""Invariants of prepared data, as plain functions the Dagster checks wrap.

Each returns an `Outcome` whose metadata shows the offending rows, so that a failed check in
the UI says what is wrong and where, not just that something is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl


@dataclass(frozen=True)
class Outcome:
    passed: bool
    description: str
    metadata: dict[str, int | float | str] = field(default_factory=dict)


def _examples(frame: pl.DataFrame, n: int = 5) -> str:
    return str(frame.head(n).to_dicts())


def unique_ids(frame: pl.DataFrame, *columns: str) -> Outcome:
    """Each of `columns` (an index and the native id it maps) identifies one row."""
    dupes = {c: frame.height - frame[c].n_unique() for c in columns}
    bad = {c: n for c, n in dupes.items() if n}
    return Outcome(
        not bad,
        f"duplicated ids: {bad}" if bad else f"{', '.join(columns)} unique over {frame.height} rows",
        {f"duplicates_{c}": n for c, n in dupes.items()},
    )


def dense_ids(frame: pl.DataFrame, column: str) -> Outcome:
    """`column` takes exactly the values 0..n-1: embedding tables index by it."""
    values = frame[column].unique()
    n = len(values)
    ok = n == 0 or (int(values.min()) == 0 and int(values.max()) == n - 1)
    return Outcome(ok, f"{column}: {n} distinct values in [{values.min()}, {values.max()}]",
                   {"distinct": n})


def non_empty_titles(items: pl.DataFrame) -> Outcome:
    bad = items.filter(pl.col("title").is_null() | (pl.col("title").str.strip_chars() == ""))
    return Outcome(bad.is_empty(), f"{bad.height} items without a title",
                   {"items_without_title": bad.height, "examples": _examples(bad)})


def min_sequence_length(sequences: pl.DataFrame, minimum: int = 3) -> Outcome:
    lengths = sequences.group_by("user_idx").len()
    short = lengths.filter(pl.col("len") < minimum)
    return Outcome(short.is_empty(), f"{short.height} users with fewer than {minimum} interactions",
                   {"short_users": short.height, "min_length": int(lengths["len"].min() or 0)})


def leave_one_out_consistent(sequences: pl.DataFrame) -> Outcome:
    """Every user: exactly one val and one test row, at the last two positions, in time order."""
    per_user = sequences.group_by("user_idx").agg(
        n=pl.len(),
        val=(pl.col("split") == "val").sum(),
        test=(pl.col("split") == "test").sum(),
        val_pos=pl.col("position").filter(pl.col("split") == "val").first(),
        test_pos=pl.col("position").filter(pl.col("split") == "test").first(),
        max_train_ts=pl.col("timestamp").filter(pl.col("split") == "train").max(),
        val_ts=pl.col("timestamp").filter(pl.col("split") == "val").first(),
        test_ts=pl.col("timestamp").filter(pl.col("split") == "test").first(),
        positions_ok=(pl.col("position").sort() == pl.int_range(pl.len())).all(),
    )
    bad = per_user.filter(
        (pl.col("val") != 1) | (pl.col("test") != 1)
        | (pl.col("test_pos") != pl.col("n") - 1) | (pl.col("val_pos") != pl.col("n") - 2)
        | (pl.col("max_train_ts") > pl.col("val_ts")) | (pl.col("val_ts") > pl.col("test_ts"))
        | ~pl.col("positions_ok")
    )
    users = per_user.height
    counts = {s: int((sequences["split"] == s).sum()) for s in ("train", "val", "test")}
    ok = bad.is_empty() and counts["val"] == users and counts["test"] == users
    return Outcome(ok, f"{bad.height} of {users} users break the leave-one-out split",
                   {"inconsistent_users": bad.height, **{f"{s}_rows": n for s, n in counts.items()},
                    "examples": _examples(bad)})
