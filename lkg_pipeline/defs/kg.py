"""Group `kg`: the knowledge graph of a dataset in DuckDB and Parquet, checked for leakage."""

import time
from pathlib import Path

import dagster as dg
import matplotlib
import polars as pl

from lkg_pipeline.core.data import validate
from lkg_pipeline.core.kg import stats
from lkg_pipeline.core.kg.graph import KGConfig, KnowledgeGraph, build_kg
from lkg_pipeline.core.kg.relations import RELATIONS
from lkg_pipeline.core.kg.warehouse import write_kg
from lkg_pipeline.defs.layout import kg_folder, warehouse_path
from lkg_pipeline.defs.metadata import markdown_table, png_markdown
from lkg_pipeline.defs.partitions import dataset_partitions
from lkg_pipeline.defs.resources import DataLake
from lkg_pipeline.defs.reuse import versioned

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BEHAVIOUR = {r.name for r in RELATIONS.values() if r.family == "behaviour"}


class KGRunConfig(dg.Config):
    """Run configuration mirroring `KGConfig`."""

    co_rated_top_n: int = KGConfig.co_rated_top_n
    co_rated_min_rating: float | None = KGConfig.co_rated_min_rating
    user_attributes: bool = KGConfig.user_attributes
    freebase: bool = KGConfig.freebase

    def to_core(self) -> KGConfig:
        return KGConfig(**self.model_dump())


@dg.asset(
    group_name="kg",
    partitions_def=dataset_partitions,
    code_version=versioned("1", __name__),
    kinds={"duckdb", "parquet"},
    ins={
        name: dg.AssetIn()
        for name in (
            "items",
            "sequences",
            "raw_users",
            "raw_tags",
            "raw_entity_links",
            "raw_entity_triples",
        )
    },
    check_specs=[
        dg.AssetCheckSpec("no_dangling_ids", asset="kg_triples", blocking=True),
        dg.AssetCheckSpec("inverses_complete", asset="kg_triples", blocking=True),
        dg.AssetCheckSpec(
            "no_held_out_leakage",
            asset="kg_triples",
            blocking=True,
            description="No val/test interaction in rated or derived edges.",
        ),
        dg.AssetCheckSpec(
            "item_metadata_coverage",
            asset="kg_triples",
            description="Warns when an item has no non-behaviour edge.",
        ),
    ],
)
def kg_triples(
    context: dg.AssetExecutionContext,
    config: KGRunConfig,
    lake: DataLake,
    items: pl.DataFrame,
    sequences: pl.DataFrame,
    raw_users: pl.DataFrame,
    raw_tags: pl.DataFrame,
    raw_entity_links: pl.DataFrame,
    raw_entity_triples: pl.DataFrame,
):
    """Typed entities and triples (each with its inverse) from training interactions only."""
    dataset = context.partition_key
    start = time.perf_counter()
    kg = build_kg(
        items,
        sequences,
        config.to_core(),
        users=raw_users,
        tags=raw_tags,
        entity_links=raw_entity_links,
        entity_triples=raw_entity_triples,
    )
    build_s = time.perf_counter() - start
    if kg.unmapped_relations:
        context.log.warning(f"Freebase relations not read: {kg.unmapped_relations}")
    database = warehouse_path(lake.path, dataset)
    paths = write_kg(kg, database, kg_folder(lake.path, dataset))
    context.log.info(
        f"{dataset}: {kg.entities.height} entities, {kg.triples.height} triples "
        f"built in {build_s:.1f}s"
    )
    checks = _kg_checks(kg, sequences, items.height)
    metadata = _kg_metadata(kg, dataset, database, paths, build_s)
    yield dg.MaterializeResult(metadata=metadata)
    yield from checks


def _kg_checks(
    kg: KnowledgeGraph, sequences: pl.DataFrame, n_items: int
) -> list[dg.AssetCheckResult]:
    outcomes = {
        "no_dangling_ids": validate.no_dangling_ids(kg.entities, kg.triples),
        "inverses_complete": validate.inverses_complete(
            kg.triples, {r.name: r.inverse for r in RELATIONS.values()}
        ),
        "no_held_out_leakage": validate.no_held_out_leakage(kg.triples, sequences, n_items),
        "item_metadata_coverage": validate.item_metadata_coverage(
            kg.entities, kg.triples, BEHAVIOUR
        ),
    }
    return [
        dg.AssetCheckResult(
            check_name=name,
            passed=outcome.passed,
            severity=(
                dg.AssetCheckSeverity.WARN
                if name == "item_metadata_coverage"
                else dg.AssetCheckSeverity.ERROR
            ),
            description=outcome.description,
            metadata=outcome.metadata,
        )
        for name, outcome in outcomes.items()
    ]


def _kg_metadata(
    kg: KnowledgeGraph, dataset: str, database: Path, paths: dict[str, Path], build_s: float
) -> dict:
    return {
        "entities": kg.entities.height,
        "triples": kg.triples.height,
        "build_seconds": round(build_s, 2),
        "duckdb": dg.MetadataValue.path(str(database)),
        "parquet": dg.MetadataValue.path(str(paths["triples"].parent)),
        "nodes_by_type": dg.MetadataValue.md(markdown_table(stats.nodes_by_type(kg))),
        "edges_by_relation": dg.MetadataValue.md(markdown_table(stats.edges_by_relation(kg))),
        "degree": dg.MetadataValue.md(markdown_table(stats.degree_stats(kg))),
        "degree_distribution": dg.MetadataValue.md(_degree_plot(kg, dataset)),
    }


def _degree_plot(kg: KnowledgeGraph, dataset: str) -> str:
    degrees = stats.degrees(kg)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for node_type in ("item", "user", "person", "genre"):
        values = degrees.filter(pl.col("type") == node_type)["degree"]
        if values.len():
            counts = values.value_counts().sort("degree")
            ax.loglog(counts["degree"], counts["count"], ".", label=node_type, alpha=0.7)
    ax.set(xlabel="degree (out-edges)", ylabel="nodes", title=f"{dataset}: degree distribution")
    ax.legend()
    markdown = png_markdown(fig, "degree distribution")
    plt.close(fig)
    return markdown
