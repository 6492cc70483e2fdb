"""Users' item sequences, split leave-one-out: what the retriever trains and is evaluated on.

Inputs are plain frames and lists, outputs are polars frames: the Dagster layer only loads,
calls and writes. All item ids here are the external dense 0-based `item_idx`.

Leave-one-out protocol: the model trains on each user's train sequence; validation input =
train sequence (target = val item), test input = train + val item (target = test item).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

SPLITS = ("train", "val", "test")


EvalSplit = Literal["val", "test"]


@dataclass(frozen=True)
class UserSequences:
    """Per-user leave-one-out sequences; list index = user_idx."""

    train: list[list[int]]  # item_idx in position order, >= 1 per user
    val: np.ndarray  # (U,) the val item of each user
    test: np.ndarray  # (U,) the test item of each user
    n_items: int

    @property
    def n_users(self) -> int:
        return len(self.train)

    def inputs(self, split: EvalSplit) -> tuple[list[list[int]], np.ndarray]:
        """(input sequences, target items) for evaluating `split`."""
        if split == "val":
            return self.train, self.val
        if split == "test":
            return [s + [int(v)] for s, v in zip(self.train, self.val, strict=True)], self.test
        raise ValueError(f"unknown split {split!r}; choose 'val' or 'test'")


def user_sequences(sequences: pl.DataFrame, n_items: int | None = None) -> UserSequences:
    """Validate the `sequences` contract and group it per user.

    Fails loudly instead of silently evaluating on a malformed split: each user needs >= 1
    train row and exactly one val and one test row at the last two positions.
    """
    need = {"user_idx", "item_idx", "position", "split"}
    missing = need - set(sequences.columns)
    assert not missing, f"sequences lacks columns {sorted(missing)}"
    bad = set(sequences["split"].unique().to_list()) - set(SPLITS)
    assert not bad, f"unknown split values {sorted(bad)}; expected {SPLITS}"
    split = pl.col("split")
    per_user = (
        sequences.sort("user_idx", "position")
        .group_by("user_idx", maintain_order=True)
        .agg(
            n=pl.len(),
            first_pos=pl.col("position").min(),
            last_pos=pl.col("position").max(),
            n_unique_pos=pl.col("position").n_unique(),
            last=split.last(),
            second_last=split.slice(-2, 1).first(),
            n_val=(split == "val").sum(),
            n_test=(split == "test").sum(),
            train=pl.col("item_idx").filter(split == "train"),
            val=pl.col("item_idx").filter(split == "val").first(),
            test=pl.col("item_idx").filter(split == "test").first(),
        )
    )
    u = per_user["user_idx"].to_numpy()
    assert (u == np.arange(len(u))).all(), "user_idx must be dense 0..U-1"
    n = per_user["n"].to_numpy()
    assert (per_user["n_val"].to_numpy() == 1).all(), "every user needs exactly one val row"
    assert (per_user["n_test"].to_numpy() == 1).all(), "every user needs exactly one test row"
    assert (n >= 3).all(), "every user needs >= 1 train row plus val and test"
    ok_pos = (per_user["first_pos"].to_numpy() == 0) & (per_user["last_pos"].to_numpy() == n - 1)
    ok_pos &= per_user["n_unique_pos"].to_numpy() == n
    assert ok_pos.all(), "positions must be 0..n-1 per user without gaps or duplicates"
    assert (per_user["last"] == "test").all() and (per_user["second_last"] == "val").all(), (
        "val and test must be each user's last two positions"
    )
    max_item = int(sequences["item_idx"].max())
    n_items = max_item + 1 if n_items is None else n_items
    assert max_item < n_items and int(sequences["item_idx"].min()) >= 0, "item_idx out of range"
    return UserSequences(
        train=[list(map(int, s)) for s in per_user["train"].to_list()],
        val=per_user["val"].to_numpy().astype(np.int64),
        test=per_user["test"].to_numpy().astype(np.int64),
        n_items=n_items,
    )
