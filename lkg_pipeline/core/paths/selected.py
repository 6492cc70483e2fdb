"""The `selected_paths` stage's batches written as parts, and what was written, tallied."""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from lkg_pipeline.core.io.storage import ParquetParts
from lkg_pipeline.core.paths.selection import PathSelection, paths_by_candidate_position


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
