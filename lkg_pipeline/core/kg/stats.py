"""Summaries of a built graph: what a person checks before trusting the paths it yields."""

import polars as pl

from lkg_pipeline.core.kg.graph import KnowledgeGraph


def nodes_by_type(kg: KnowledgeGraph) -> pl.DataFrame:
    """Nodes per entity type: shows at a glance which sources made it into the graph."""
    return kg.entities.group_by("type").len("nodes").sort("type")


def edges_by_relation(kg: KnowledgeGraph) -> pl.DataFrame:
    """Edges per relation with its family and endpoint types: an empty relation stands out."""
    return (
        kg.triples.group_by("relation")
        .len("edges")
        .join(kg.relations.select("relation", "family", "head_type", "tail_type"), on="relation")
        .sort("family", "relation")
    )


def degrees(kg: KnowledgeGraph) -> pl.DataFrame:
    """Out-degree of every entity, isolated ones as 0: hubs and orphans both shape the paths."""
    out = kg.triples.group_by("head").len("degree")
    return (
        kg.entities.select("entity_id", "type")
        .join(out, left_on="entity_id", right_on="head", how="left")
        .with_columns(pl.col("degree").fill_null(0))
    )


def degree_stats(kg: KnowledgeGraph) -> pl.DataFrame:
    """Degree quantiles per entity type: hubs make path counts explode, isolates yield none."""
    return (
        degrees(kg)
        .group_by("type")
        .agg(
            nodes=pl.len(),
            mean=pl.col("degree").mean(),
            median=pl.col("degree").median(),
            p99=pl.col("degree").quantile(0.99),
            max=pl.col("degree").max(),
            isolated=(pl.col("degree") == 0).sum(),
        )
        .sort("type")
    )
