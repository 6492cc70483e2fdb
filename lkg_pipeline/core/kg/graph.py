"""The heterogeneous knowledge graph: typed nodes, typed directed relations, each with its inverse.

Built from training interactions only: the graph is what prompts are written from, so a single
val/test interaction in it (or in anything derived from it, like co-rating counts) would let a
path point at the very item we are asked to predict.

Node ids are dense and stable: items keep their `item_idx` (0..I-1), users follow at
I + `user_idx`, and attribute nodes come after, ordered by (type, key). Paths and prompts can
therefore map a node to an item without a lookup.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from lkg_pipeline.core.kg.edges import (
    EDGE_SCHEMA,
    amazon_edges,
    co_rated_edges,
    item_key,
    movielens_edges,
    rated_edges,
    tag_edges,
    user_attribute_edges,
    user_key,
)
from lkg_pipeline.core.kg.freebase import attribute_names, freebase_edges
from lkg_pipeline.core.kg.relations import RELATIONS

ENTITY_SCHEMA = {"entity_id": pl.Int64, "type": pl.String, "key": pl.String, "name": pl.String}
TRIPLE_SCHEMA = {
    "head": pl.Int64,
    "relation": pl.String,
    "tail": pl.Int64,
    "weight": pl.Float64,
    "rating": pl.Float32,
    "timestamp": pl.Int64,
}


@dataclass(frozen=True)
class KGConfig:
    co_rated_top_n: int = 20  # strongest co-rated neighbours kept per item; 0 turns co_rated off
    co_rated_min_rating: float | None = None  # only ratings ≥ this count as "liked" (None: all)
    user_attributes: bool = False  # age group / gender / occupation nodes (ablation switch)
    freebase: bool = True  # RecBole's Freebase facts for ml-100k, when present

    def __post_init__(self) -> None:
        if self.co_rated_top_n < 0:
            raise ValueError(f"co_rated_top_n={self.co_rated_top_n} must be ≥ 0")


@dataclass
class KnowledgeGraph:
    entities: pl.DataFrame  # ENTITY_SCHEMA + item_idx / user_idx where the node is one
    triples: pl.DataFrame  # TRIPLE_SCHEMA, both directions, sorted by (head, relation, tail)
    relations: pl.DataFrame  # one row per Relation present
    unmapped_relations: dict[str, int]  # Freebase relations we do not read, with counts


def build_kg(
    items: pl.DataFrame,
    sequences: pl.DataFrame,
    config: KGConfig = KGConfig(),
    *,
    users: pl.DataFrame | None = None,
    tags: pl.DataFrame | None = None,
    entity_links: pl.DataFrame | None = None,
    entity_triples: pl.DataFrame | None = None,
) -> KnowledgeGraph:
    """The graph of one dataset from prepared items and sequences plus optional side tables."""
    train = sequences.filter(pl.col("split") == "train")
    forward: list[pl.DataFrame] = [
        rated_edges(train),
        co_rated_edges(train, config.co_rated_top_n, config.co_rated_min_rating),
        *movielens_edges(items),
        *amazon_edges(items),
    ]
    unmapped: dict[str, int] = {}
    if (
        config.freebase
        and entity_links is not None
        and entity_triples is not None
        and not entity_links.is_empty()
    ):
        fb, unmapped = freebase_edges(items, entity_links, entity_triples)
        forward += fb
    if tags is not None and not tags.is_empty():
        forward.append(tag_edges(tags, sequences, items))
    if config.user_attributes and users is not None and not users.is_empty():
        forward += user_attribute_edges(sequences, users)
    edges = pl.concat([e.select(list(EDGE_SCHEMA)).cast(EDGE_SCHEMA) for e in forward])
    entities = _entities(items, sequences, edges)
    triples = _with_inverses(_to_ids(edges, entities))
    return KnowledgeGraph(entities, triples, _relations(triples["relation"].unique()), unmapped)


def _entities(items: pl.DataFrame, sequences: pl.DataFrame, edges: pl.DataFrame) -> pl.DataFrame:
    n_items = items.height
    users = sequences.select("user_idx", "user_id").unique().sort("user_idx")
    item_nodes = items.select(
        entity_id=pl.col("item_idx").cast(pl.Int64),
        type=pl.lit("item"),
        key=item_key(pl.col("item_idx")),
        name=pl.col("title"),
        item_idx=pl.col("item_idx"),
        user_idx=pl.lit(None, pl.Int32),
    )
    user_nodes = users.select(
        entity_id=(pl.col("user_idx") + n_items).cast(pl.Int64),
        type=pl.lit("user"),
        key=user_key(pl.col("user_idx")),
        name=pl.lit("user ") + pl.col("user_id").cast(pl.String),
        item_idx=pl.lit(None, pl.Int32),
        user_idx=pl.col("user_idx"),
    )
    others = (
        edges.filter(
            ~pl.col("tail_key").str.starts_with("item:")
            & ~pl.col("tail_key").str.starts_with("user:")
        )
        .select(key=pl.col("tail_key"))
        .unique()
        .with_columns(
            type=pl.col("key").str.split_exact(":", 1).struct.field("field_0"),
            value=pl.col("key").str.splitn(":", 2).struct.field("field_1"),
        )
        .sort("type", "key")
    )
    names = attribute_names(edges, items)
    others = others.join(names, on="key", how="left").select(
        entity_id=(pl.int_range(pl.len()) + n_items + users.height).cast(pl.Int64),
        type=pl.col("type"),
        key=pl.col("key"),
        name=pl.coalesce(pl.col("derived_name"), pl.col("value")),
        item_idx=pl.lit(None, pl.Int32),
        user_idx=pl.lit(None, pl.Int32),
    )
    return pl.concat([item_nodes, user_nodes, others])


def _to_ids(edges: pl.DataFrame, entities: pl.DataFrame) -> pl.DataFrame:
    ids = entities.select("key", "entity_id")
    return (
        edges.join(ids.rename({"key": "head_key", "entity_id": "head"}), on="head_key")
        .join(ids.rename({"key": "tail_key", "entity_id": "tail"}), on="tail_key")
        .select(list(TRIPLE_SCHEMA))
    )


def _with_inverses(triples: pl.DataFrame) -> pl.DataFrame:
    inverse = pl.col("relation").replace_strict({r.name: r.inverse for r in RELATIONS.values()})
    flipped = triples.select(
        head=pl.col("tail"),
        relation=inverse,
        tail=pl.col("head"),
        weight="weight",
        rating="rating",
        timestamp="timestamp",
    )
    both = pl.concat([triples, flipped]).unique(["head", "relation", "tail"], keep="first")
    return both.sort("head", "relation", "tail").cast(TRIPLE_SCHEMA)


def _relations(names: Iterable[str]) -> pl.DataFrame:
    rows = [RELATIONS[n] for n in sorted(names)]
    return pl.DataFrame(
        [(r.name, r.inverse, r.head_type, r.tail_type, r.family, r.label) for r in rows],
        schema=["relation", "inverse", "head_type", "tail_type", "family", "label"],
        orient="row",
    )
