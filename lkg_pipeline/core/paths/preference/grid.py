"""The preference module's input: ranking examples as a grid of per-type path counts, read from
kg_paths' files.

At 1M users the path counts do not fit in memory as frames (pair_features: 102M rows), so
`read_grid` builds the training grid from kg_paths' files a batch of users at a time and keeps
the exact integer counts (uint8 where they fit, 80 B per example); `preference_ranks`
(`preference_ranking`) scores and ranks the other examples batch by batch. Every computation
over the grid runs in chunks of rows, in an order that gives the same numbers, bit for bit, as
one pass over in-memory frames.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from lkg_pipeline.core.paths.batches import read_users, user_batches

USERS_PER_BATCH = 2_500  # users whose path counts are read together: bounds memory only


CHUNK_ROWS = 65_536  # examples per chunk of a pass over the grid: (65,536, 20, 4) float32 = 21 MB


SPLITS = ("train", "val", "test")  # PathGrid.split holds the index of an example's split


FEATURE_COLUMNS = ("example_id", "candidate_item_idx", "path_type", "n_paths")


HISTORY_COLUMNS = ("user_idx", "path_type", "weight")


@dataclass
class PathGrid:
    """Examples as padded arrays; candidate position k is the order of candidate_item_idxs.

    Path counts are kept as exact integers in the narrowest unsigned type that holds them and
    decoded to log1p(float32) a chunk of rows at a time (`feats`): at 20 candidates × 4 types,
    80 B an example (uint8) instead of 320 B, and no float32 copy of the whole grid. Splits are
    indices into SPLITS (1 B, not a 20 B string). At 1M Beauty-like users the grid is what the
    preference stage holds (benchmarks/paths/AFTER_PATHS.md), so every byte an example saves is
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


def history_profiles(history: pl.DataFrame | None, path_types: Sequence[str], users: np.ndarray):
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


def candidate_grid(examples: pl.DataFrame, width: int | None = None) -> PathGrid:
    """The candidate grid of the examples, without features (those are filled by path_grid), with
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


def grid_cells(g: PathGrid) -> pl.DataFrame:
    """(example_id, candidate_item_idx, r, p): every real candidate and its grid cell."""
    r, p = np.nonzero(g.cand >= 0)
    cand = g.cand[r, p].astype(np.int64)
    return pl.DataFrame({"example_id": g.example_id[r], "candidate_item_idx": cand, "r": r, "p": p})


def _count_dtype(largest: int) -> np.dtype:
    """The smallest unsigned type that holds `largest` (counts are exact): uint8 on the data
    seen so far (ml-100k's largest count is 56, Beauty-like 46)."""
    return np.promote_types(np.uint8, np.min_scalar_type(largest))


def path_grid(
    examples: pl.DataFrame,
    pair_features: pl.DataFrame,
    history: pl.DataFrame | None,
    path_types: Sequence[str],
    width: int | None = None,
) -> PathGrid:
    """Candidates plus features. Pair features of candidates not in an example's list (or of
    absent examples) are ignored; duplicate (example, candidate, type) rows add up."""
    g = candidate_grid(examples, width)
    g.path_types = list(path_types)
    pf = pair_features.select(
        pl.col("example_id").cast(pl.Int64),
        pl.col("candidate_item_idx").cast(pl.Int64),
        "path_type",
        pl.col("n_paths").cast(pl.Int64),
    )
    codes = _type_codes(pf["path_type"], path_types, "pair_features")
    pf = pf.with_columns(code=pl.Series(codes, dtype=pl.Int64)).join(
        grid_cells(g), on=["example_id", "candidate_item_idx"]
    )
    assert (pf["n_paths"] >= 0).all(), "n_paths must be >= 0"
    cells = pf.group_by("r", "p", "code").agg(pl.col("n_paths").sum())
    largest = int(cells["n_paths"].max() or 0)
    g.counts = np.zeros((*g.cand.shape, len(path_types)), dtype=_count_dtype(largest))
    cell = (cells["r"].to_numpy(), cells["p"].to_numpy(), cells["code"].to_numpy())
    g.counts[cell] = cells["n_paths"].to_numpy()
    uniq, inverse = np.unique(g.users.numpy(), return_inverse=True)
    g.user_ids = torch.from_numpy(uniq)
    g.user_profile = history_profiles(history, path_types, uniq)  # (U, T)
    g.profile = g.user_profile[torch.from_numpy(inverse)]  # (E, T)
    return g


def in_splits(splits: Sequence[str] | None) -> pl.Expr:
    """Whether an example belongs to `splits` (None: every split)."""
    return pl.lit(True) if splits is None else pl.col("split").is_in(list(splits))


def split_positions(examples: pl.DataFrame, splits: Sequence[str] | None) -> np.ndarray:
    """Ascending row positions of the examples of `splits` (None: every example)."""
    assert examples["example_id"].n_unique() == examples.height, "example_id must be unique"
    if splits is None:
        return np.arange(examples.height)
    return np.flatnonzero(examples.select(in_splits(splits)).to_series().to_numpy())


def rows_by_user(
    examples: pl.DataFrame,
    keep: np.ndarray,
    splits: Sequence[str] | None,
    users_per_batch: int,
) -> Iterator[tuple[pl.Series, np.ndarray, pl.DataFrame]]:
    """Each batch of users of `examples` (`user_batches`), with the ascending indices into
    `keep` (`split_positions(examples, splits)`) of the kept examples of those users (empty for a
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
        selected = examples.filter(mine & in_splits(splits)) if len(rows) else examples.clear()
        assert selected.height == len(rows), "a batch's examples differ from its rows"
        yield batch, rows, selected


def read_user_batch(
    examples: pl.DataFrame,
    folder: Path,
    users: pl.Series,
    path_types: Sequence[str],
    width: int,
) -> tuple[PathGrid, pl.DataFrame]:
    """`path_grid` of `examples` (examples of `users` only) from those users' rows of kg_paths'
    tables, and their history profile rows."""
    history = read_users(folder / "history_profile.parquet", users, HISTORY_COLUMNS)
    features = read_users(folder / "pair_features.parquet", users, FEATURE_COLUMNS)
    return path_grid(examples, features, history, path_types, width), history


def read_grid(
    examples: pl.DataFrame,
    folder: str | Path,
    path_types: Sequence[str],
    users_per_batch: int = USERS_PER_BATCH,
    splits: Sequence[str] | None = ("train", "val"),
) -> PathGrid:
    """The grid of the examples of `splits` from kg_paths' tables in `folder`, read a batch
    of users at a time: the rows of `path_grid` on the whole frames, in `examples` order and as
    wide (K) as the longest list, so training on it gives the same numbers. Training never
    looks at the test split, and `preference_ranks` scores it, hence the default. The user
    profiles cover every user of `examples`, as the π statistics of `train_preference` do.
    """
    folder = Path(folder)
    keep = split_positions(examples, splits)
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
    for users, rows, batch in rows_by_user(examples, keep, splits, users_per_batch):
        ids = users.to_numpy().astype(np.int64)
        if len(rows):
            b, history = read_user_batch(batch, folder, users, path_types, k)
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
        g.user_profile[done : done + len(ids)] = history_profiles(history, path_types, ids)
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


def row_chunks(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`rows` in near-equal chunks of at most CHUNK_ROWS. Equal, not CHUNK_ROWS and a
    remainder: the history encoder's matmul rounds differently for fewer than 12 rows (MKL's
    small-M kernels, measured), so a tiny last chunk would change the last bit of its scores.
    """
    return rows.tensor_split(max(1, -(-len(rows) // CHUNK_ROWS)))
