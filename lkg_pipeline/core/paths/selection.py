"""Which enumerated paths a prompt shows: per (example, candidate), the paths of the types the
user's preference ranks highest, with ties broken by a key that does not depend on the order
of the candidate list.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import polars as pl

from lkg_pipeline.core.io.storage import ParquetParts
from lkg_pipeline.core.paths.batches import (
    bounded_user_batches,
    read_users,
    rows_per_user,
    user_batches,
)

TieBreak = Literal["hashed", "candidate_order"]


TIE_BREAKS: tuple[str, ...] = get_args(TieBreak)


@dataclass(frozen=True)
class PathSelection:
    """Which of an example's enumerated paths its prompt shows (`select_paths`)."""

    per_history_item: int = 1  # the reference: one relation line per history item
    max_paths: int = 20
    # path types never shown (a path's type is its first relation: the 1-hop relation, or the
    # one into a 2-hop path's shared attribute, e.g. "co_rated", "from_country"; a 3-hop path
    # of another type may still step through an excluded relation); a history item without
    # another path gets no line
    exclude_path_types: tuple[str, ...] = ()
    # how ties between candidates are broken (`select_paths`): `hashed`, blind to the
    # candidates' order; `candidate_order` leaks the retriever's rank into val/test prompts
    tie_break: TieBreak = "hashed"

    def __post_init__(self) -> None:
        excluded = self.exclude_path_types
        if isinstance(excluded, str):
            raise TypeError(f"exclude_path_types is a list of path types, not {excluded!r}")
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break={self.tie_break!r}: one of {TIE_BREAKS}")
        # sorted and unique: the same exclusion records the same settings in any order
        object.__setattr__(self, "exclude_path_types", tuple(sorted(set(excluded))))

    @classmethod
    def from_dict(cls, raw: dict) -> PathSelection:
        """A recorded selection; one recorded before `tie_break` existed was made in candidate
        order, and prompts made again for its adapter must be made the same way."""
        return cls(**({"tie_break": "candidate_order"} | raw))


def selections_in_batches(
    paths_file: Path,
    preferences: pl.DataFrame,
    selection: PathSelection,
    users_per_batch: int,
    paths_per_batch: int | None = None,
) -> Iterator[pl.DataFrame]:
    """Both KG variants' `select_paths` (column `variant`: `kg_rag` without preferences,
    `lkg_rag` with them), a batch of the preferences' users at a time: the enumerated paths
    are the largest table of the pipeline (608M rows at 1M Beauty-like users). A batch holds
    at most `users_per_batch` users and `paths_per_batch` paths (`bounded_user_batches`)."""
    if paths_per_batch is None:
        batches = user_batches(preferences, users_per_batch)
    else:
        counts = rows_per_user(paths_file, preferences["user_idx"])
        batches = bounded_user_batches(counts, users_per_batch, paths_per_batch)
    for users in batches or [preferences["user_idx"]]:
        paths = read_users(paths_file, users)
        mine = preferences.filter(pl.col("user_idx").is_in(users.implode()))
        yield pl.concat(
            [
                select_paths(paths, None, selection).with_columns(variant=pl.lit("kg_rag")),
                select_paths(paths, mine, selection).with_columns(variant=pl.lit("lkg_rag")),
            ],
            how="diagonal_relaxed",
        ).drop("weight", strict=False)


def examples_changed_by_candidate_order(
    paths: pl.DataFrame,
    preferences: pl.DataFrame | None,
    selection: PathSelection,
) -> int:
    """How many examples' selections change when their candidates are listed in reverse (the
    table `enumerate_paths` would make from the reversed lists: candidates in reverse, each
    pair's paths in their own order): 0 is what keeps the retriever's rank out of the prompts
    (`select_paths`)."""

    def shown(table: pl.DataFrame) -> pl.DataFrame:
        return select_paths(table, preferences, selection).select(
            "example_id", "history_item_idx", "candidate_item_idx",
            pl.col("via").fill_null(-1), pl.col("relations").list.join(">"),
            *([pl.col("via_item").fill_null(-1)] if "via_item" in table.columns else []),
        )  # fmt: skip

    as_listed = shown(paths)
    reversed_ = shown(
        paths.with_row_index("listed")
        .with_columns(-pl.col("candidate_position"))
        .sort(
            "example_id",
            "history_position",
            "candidate_position",
            "listed",
            descending=[False, True, False, False],
        )  # fmt: skip
        .drop("listed")
    )
    keys = as_listed.columns
    changed = pl.concat(
        [
            as_listed.join(reversed_, on=keys, how="anti")["example_id"],
            reversed_.join(as_listed, on=keys, how="anti")["example_id"],
        ]
    )
    return changed.n_unique()


def paths_by_candidate_position(selected: pl.DataFrame, examples: pl.Series) -> pl.DataFrame:
    """(candidate_position from 1, one column per variant): the mean number of paths a prompt
    of `examples` shows for the candidate at each position. On val/test the position is the
    retriever's rank, so a steep fall here is the retriever's order showing through; some
    fall is genuine (the retriever's first picks are the ones the history relates to)."""
    shown = selected.filter(pl.col("example_id").is_in(examples.implode()))
    per_variant = shown.group_by("variant", "candidate_position").agg(
        mean_paths=(pl.len() / max(examples.n_unique(), 1)).round(2)
    )
    wide = per_variant.pivot("variant", index="candidate_position", values="mean_paths")
    return (
        wide.select("candidate_position", *sorted(wide.columns[1:]))
        .with_columns(pl.col("candidate_position") + 1)
        .sort("candidate_position")
        .with_columns(pl.exclude("candidate_position").fill_null(0.0))
    )


_TIE_MODULUS = 2**31 - 1  # a prime; every product below stays inside int64


def candidate_tie_key(example_id: pl.Expr, candidate_item_idx: pl.Expr) -> pl.Expr:
    """A pseudo-random rank of each candidate within its example, from ids alone: the same on
    every run and polars version (modular arithmetic, not `Expr.hash`, whose values may
    change between versions), unrelated to where the candidate sits in the list, and
    different from one example to the next."""
    m = _TIE_MODULUS
    x = (example_id.cast(pl.Int64) % m * 1_103_515_245 + candidate_item_idx.cast(pl.Int64) + 1) % m
    x = (x * 48_271 + 12_345) % m
    return (x * x % m * 69_621 + x) % m


def select_paths(
    paths: pl.DataFrame,
    preferences: pl.DataFrame | None,
    selection: PathSelection = PathSelection(),
) -> pl.DataFrame:
    """The paths a prompt shows (`selection`): `per_history_item` per history item, at most
    `max_paths`, none of a type in `exclude_path_types`.

    With `preferences` (user_idx, path_type, weight) the path type that counts most for this
    user wins (`lkg_rag`), rarer intermediate nodes first on ties; without, the fewest hops win
    (`kg_rag`, the reference's shortest path). Most recent history items come first, so the
    cap drops the oldest.

    Ties between candidates are frequent (one history item has equally short paths to several
    candidates) and decide which candidate a prompt links to the history at all. `hashed`
    breaks them by a hash of (example, candidate), blind to the candidates' order; the
    reference's `candidate_order` (first enumerated wins) hands them to the earliest
    candidate, which on val/test is the retriever's first: the paths then carry the
    retriever's rank into the prompt (on ml-100k test `kg_rag` showed 12.6 paths for the
    retriever's first candidate and 0.1 for its last), a cue train prompts, whose candidates
    are shuffled, never taught. Kept to reproduce that measurement, not to be used.
    """
    # The ranking runs on the key columns and a row number alone; only the chosen rows are
    # then gathered with their lists and names: sorting the whole batch's paths with every
    # column held ~+500 MB at 2,500 Beauty-like users (1.4M paths), this a fraction of it.
    # The row number is the last key, so ties keep the (deterministic) order of the table;
    # with `hashed` only paths between the same two items are left to it.
    if selection.tie_break == "hashed":
        candidate_key = ["candidate_tie", "candidate_item_idx"]
        tie = candidate_tie_key(pl.col("example_id"), pl.col("candidate_item_idx"))
    else:  # "candidate_order" (PathSelection admits no other)
        candidate_key, tie = ["candidate_position"], pl.lit(0)
    ranked = paths.with_row_index("row").select(
        "row",
        "example_id", "history_position", "history_item_idx", "path_type",
        "hops", "candidate_position", "candidate_item_idx", "via_degree",
        tie.alias("candidate_tie"),
        *(["user_idx"] if preferences is not None else []),
    )  # fmt: skip
    if selection.exclude_path_types:
        ranked = ranked.filter(~pl.col("path_type").is_in(list(selection.exclude_path_types)))
    if preferences is not None:
        ranked = ranked.join(
            preferences.select("user_idx", "path_type", "weight"),
            on=["user_idx", "path_type"],
            how="left",
        ).with_columns(pl.col("weight").fill_null(0.0))
        keys = ["weight", "via_degree", "hops", *candidate_key]
        descending = [True] + [False] * (len(keys) - 1)
    else:
        keys = ["hops", *candidate_key, "via_degree"]
        descending = [False] * len(keys)
    chosen = (
        ranked.sort(
            ["example_id", "history_position", *keys, "row"],
            descending=[False, True, *descending, False],
        )
        .group_by("example_id", "history_item_idx", maintain_order=True)
        .head(selection.per_history_item)
        .group_by("example_id", maintain_order=True)
        .head(selection.max_paths)
    )
    # (columns as a group_by head leaves them: its keys first)
    selected = paths.select(
        pl.col("example_id", "history_item_idx").gather(chosen["row"]),
        pl.exclude("example_id", "history_item_idx").gather(chosen["row"]),
    )
    if preferences is not None:
        selected = selected.with_columns(chosen["weight"])
    return selected.with_columns(selection_rank=pl.int_range(1, pl.len() + 1).over("example_id"))


def check_excluded_types(selection: PathSelection, preferences: pl.DataFrame, where: str) -> None:
    """Fails on an excluded path type the dataset does not have: a typo would exclude nothing."""
    known = set(preferences["path_type"].unique().to_list())
    unknown = sorted(set(selection.exclude_path_types) - known)
    if unknown:
        raise ValueError(
            f"{where}: exclude_path_types {unknown} are not path types of this "
            f"dataset's paths; they are {sorted(known)}"
        )


def held_out_examples(candidates: Path) -> pl.Series:
    """The val/test example ids: where the candidate position is the retriever's rank."""
    return (
        pl.scan_parquet(candidates)
        .filter(pl.col("split") != "train")
        .select("example_id")
        .collect()["example_id"]
    )


@dataclass(frozen=True)
class SelectionTally:
    """What `write_selections` wrote, summed over its batches."""

    rows: int
    per_prompt: pl.DataFrame  # variant, prompts, mean, max paths per prompt
    per_variant: pl.DataFrame  # variant, path_type, len: selected paths of each type
    by_candidate_position: pl.DataFrame  # `paths_by_candidate_position` of the held-out examples


def write_selections(
    batches: Iterable[pl.DataFrame], parts: ParquetParts, held_out: pl.Series
) -> SelectionTally:
    """Each batch as a part, keeping only small counts: the selection never is in memory whole."""
    per_example, by_type, by_position = [], [], []
    for table in batches:
        parts.write(table)
        per_example.append(table.group_by("variant", "example_id").len())
        by_type.append(table.group_by("variant", "path_type").len())
        by_position.append(
            table.filter(pl.col("example_id").is_in(held_out.implode())).select(
                "variant", "example_id", "candidate_position"
            )
        )
    counts = pl.concat(per_example)
    return SelectionTally(
        rows=int(counts["len"].sum()),
        per_prompt=counts.group_by("variant")
        .agg(prompts=pl.len(), mean=pl.col("len").mean(), max=pl.col("len").max())
        .sort("variant"),
        per_variant=pl.concat(by_type)
        .group_by("variant", "path_type")
        .agg(pl.col("len").sum())
        .sort("variant", "len", descending=[False, True]),
        by_candidate_position=paths_by_candidate_position(pl.concat(by_position), held_out),
    )
