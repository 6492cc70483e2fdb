"""Group `paths`: KG paths from each user's history to each candidate, and the preference module."""

from pathlib import Path

import dagster as dg
import polars as pl

from lkg_pipeline.core.paths import PathConfig, enumerate_paths, signal_by_type
from lkg_pipeline.core.storage import write_parquet_atomic
from lkg_pipeline.core.warehouse import read_parquet, write_tables
from lkg_pipeline.defs.kg import kg_folder
from lkg_pipeline.defs.metadata import markdown_table
from lkg_pipeline.defs.partitions import dataset_partitions
from lkg_pipeline.defs.resources import DataLake

PATH_TABLES = ("paths", "pair_features", "history_profile")
PATHS_DDL = """
create table paths as select * from paths_df order by example_id, history_position desc;
create table pair_features as select * from pair_features_df order by all;
create table history_profile as select * from history_profile_df order by all;
"""


class PathRunConfig(dg.Config):
    """Run configuration mirroring `PathConfig`."""

    history_len: int = 20
    max_hops: int = 2
    max_paths_per_pair: int = 3
    max_attribute_degree: int | None = None

    def to_core(self) -> PathConfig:
        return PathConfig(**self.model_dump())


def paths_folder(lake: Path, dataset: str) -> Path:
    return lake / "paths" / "kg_paths" / dataset


def read_paths(lake: Path, dataset: str) -> dict[str, pl.DataFrame]:
    folder = paths_folder(lake, dataset)
    return {name: pl.read_parquet(folder / f"{name}.parquet") for name in PATH_TABLES}


@dg.asset(
    group_name="paths",
    partitions_def=dataset_partitions,
    code_version="1",
    kinds={"duckdb", "parquet"},
    deps=["kg_triples"],
    ins={"candidates": dg.AssetIn(), "sequences": dg.AssetIn(), "items": dg.AssetIn()},
    check_specs=[
        dg.AssetCheckSpec(
            "graph_carries_signal",
            asset="kg_paths",
            description="Warns unless true items have more paths on average than other candidates.",
        )
    ],
)
def kg_paths(
    context: dg.AssetExecutionContext,
    config: PathRunConfig,
    lake: DataLake,
    candidates: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
):
    """Per-type path counts for every (example, candidate) and a capped sample of paths."""
    dataset = context.partition_key
    kg = read_parquet(kg_folder(lake.path, dataset))
    out = enumerate_paths(
        candidates,
        sequences,
        kg.entities,
        kg.triples,
        kg.relations,
        items.height,
        config.to_core(),
    )
    folder = paths_folder(lake.path, dataset)
    tables = {
        "paths": out.paths,
        "pair_features": out.pair_features,
        "history_profile": out.history_profile,
    }
    for name, frame in tables.items():
        write_parquet_atomic(frame, folder / f"{name}.parquet")
    database = lake.path / "warehouse" / f"{dataset}_paths.duckdb"
    write_tables({f"{k}_df": v for k, v in tables.items()}, PATHS_DDL, database)
    context.log.info(f"{dataset}: {out.stats}")
    by_type = (
        out.pair_features.group_by("path_type")
        .agg(pairs=pl.len(), paths=pl.col("n_paths").sum())
        .sort("paths", descending=True)
    )
    yield dg.MaterializeResult(
        metadata={
            "parquet": dg.MetadataValue.path(str(folder)),
            "duckdb": dg.MetadataValue.path(str(database)),
            "stats": dg.MetadataValue.md(
                markdown_table(
                    pl.DataFrame(
                        {
                            "statistic": list(out.stats),
                            "value": [str(v) for v in out.stats.values()],
                        }
                    )
                )
            ),
            "paths_by_type": dg.MetadataValue.md(markdown_table(by_type)),
            "signal_by_type": dg.MetadataValue.md(
                markdown_table(signal_by_type(candidates, out.pair_features))
            ),
            "sample": dg.MetadataValue.md(
                markdown_table(
                    out.paths.head(10).select(
                        "example_id",
                        "history_item_idx",
                        "candidate_item_idx",
                        "path_type",
                        "via_name",
                    )
                )
            ),
            **{k: v for k, v in out.stats.items() if isinstance(v, int | float)},
        }
    )
    targets, others = out.stats["mean_paths_to_targets"], out.stats["mean_paths_to_non_targets"]
    yield dg.AssetCheckResult(
        check_name="graph_carries_signal",
        passed=targets > others,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"true items: {targets:.1f} paths on average, other candidates: {others:.1f}",
        metadata={"mean_paths_to_targets": targets, "mean_paths_to_non_targets": others},
    )
