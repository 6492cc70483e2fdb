"""Forward edges of the graph, one source at a time, before ids are assigned: interactions
(rated, co_rated), MovieLens genres and years, tags, Amazon metadata, user attributes.

Each returns frames in EDGE_SCHEMA with node keys "<type>:<value>"; `graph.build_kg` turns the
keys into ids and adds the inverse of every edge.
"""

from __future__ import annotations

import duckdb
import polars as pl

AGE_GROUPS = (
    (18, "under 18"),
    (25, "18-24"),
    (35, "25-34"),
    (45, "35-44"),
    (50, "45-49"),
    (56, "50-55"),
    (1000, "56+"),
)

# Forward edges before ids are assigned: node keys are "<type>:<value>".
EDGE_SCHEMA = {
    "head_key": pl.String,
    "relation": pl.String,
    "tail_key": pl.String,
    "weight": pl.Float64,
    "rating": pl.Float32,
    "timestamp": pl.Int64,
}


def item_key(idx: pl.Expr) -> pl.Expr:
    return pl.lit("item:") + idx.cast(pl.String)


def user_key(idx: pl.Expr) -> pl.Expr:
    return pl.lit("user:") + idx.cast(pl.String)


def forward_edges(
    frame: pl.DataFrame, head: pl.Expr, relation: str, tail: pl.Expr, weight: pl.Expr | None = None
) -> pl.DataFrame:
    """Forward edges in EDGE_SCHEMA, one per distinct (head, tail), from any frame."""
    edges = frame.select(
        head_key=head,
        relation=pl.lit(relation),
        tail_key=tail,
        weight=(weight if weight is not None else pl.lit(1.0)).cast(pl.Float64),
        rating=pl.lit(None, pl.Float32),
        timestamp=pl.lit(None, pl.Int64),
    ).drop_nulls(["head_key", "tail_key"])
    return edges.unique(["head_key", "tail_key"], keep="first", maintain_order=True)


def rated_edges(train: pl.DataFrame) -> pl.DataFrame:
    return train.select(
        head_key=user_key(pl.col("user_idx")),
        relation=pl.lit("rated"),
        tail_key=item_key(pl.col("item_idx")),
        weight=pl.lit(1.0),
        rating=pl.col("rating").cast(pl.Float32),
        timestamp=pl.col("timestamp"),
    )


CO_RATED_SQL = """
with liked as (select user_idx, item_idx from train where rating >= $min_rating),
pairs as (
    select a.item_idx as i, b.item_idx as j, count(*) as w
    from liked a join liked b on a.user_idx = b.user_idx and a.item_idx <> b.item_idx
    group by all
),
ranked as (
    select i, j, w, row_number() over (partition by i order by w desc, j) as r from pairs
)
select distinct least(i, j) as i, greatest(i, j) as j, w from ranked where r <= $top_n
order by i, j
"""


def co_rated_edges(train: pl.DataFrame, top_n: int, min_rating: float | None) -> pl.DataFrame:
    """Item pairs rated by the same users (weight = how many), train split only.

    A pair is kept when either item ranks the other among its `top_n` strongest (ties by lower
    item index), and stored once here (i < j): the inverse pass adds the other direction.
    """
    if top_n == 0:
        return pl.DataFrame(schema=EDGE_SCHEMA)
    con = duckdb.connect()
    con.register("train", train.select("user_idx", "item_idx", "rating"))
    pairs = con.sql(
        CO_RATED_SQL,
        params={
            "min_rating": float("-inf") if min_rating is None else min_rating,
            "top_n": top_n,
        },
    ).pl()
    con.close()
    return forward_edges(
        pairs, item_key(pl.col("i")), "co_rated", item_key(pl.col("j")), pl.col("w")
    )


def movielens_edges(items: pl.DataFrame) -> list[pl.DataFrame]:
    genres = items.select("item_idx", "genres").explode("genres").drop_nulls("genres")
    return [
        forward_edges(
            genres, item_key(pl.col("item_idx")), "has_genre", pl.lit("genre:") + pl.col("genres")
        ),
        forward_edges(
            items.drop_nulls("year"),
            item_key(pl.col("item_idx")),
            "released_in",
            pl.lit("year:") + pl.col("year").cast(pl.String),
        ),
    ]


def tag_edges(tags: pl.DataFrame, sequences: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """item → tag (weight = users who applied it), never from a user's own val/test item."""
    held_out = sequences.filter(pl.col("split") != "train").select("user_id", "item_id")
    usable = (
        tags.join(held_out, on=["user_id", "item_id"], how="anti")
        .join(items.select("item_id", "item_idx"), on="item_id")
        .with_columns(tag=pl.col("tag").str.strip_chars().str.to_lowercase())
        .filter(pl.col("tag") != "")
        .group_by("item_idx", "tag")
        .agg(w=pl.col("user_id").n_unique())
        .sort("item_idx", "tag")
    )
    return forward_edges(
        usable, item_key(pl.col("item_idx")), "tagged", pl.lit("tag:") + pl.col("tag"), pl.col("w")
    )


def amazon_edges(items: pl.DataFrame) -> list[pl.DataFrame]:
    idx = items.select(
        pl.col("item_id").cast(pl.String).alias("other_id"), pl.col("item_idx").alias("other_idx")
    )
    paths = items.select("item_idx", "categories").explode("categories").drop_nulls("categories")
    levels = paths.explode("categories").drop_nulls("categories")
    out = [
        forward_edges(
            items.drop_nulls("brand"),
            item_key(pl.col("item_idx")),
            "has_brand",
            pl.lit("brand:") + pl.col("brand"),
        ),
        forward_edges(
            levels,
            item_key(pl.col("item_idx")),
            "in_category",
            pl.lit("category:") + pl.col("categories"),
        ),
        forward_edges(
            paths.filter(pl.col("categories").list.len() > 0),
            item_key(pl.col("item_idx")),
            "has_category_path",
            pl.lit("category_path:") + pl.col("categories").list.join(" > "),
        ),
        forward_edges(
            items.drop_nulls("sales_rank_category"),
            item_key(pl.col("item_idx")),
            "ranked_in",
            pl.lit("sales_rank_category:") + pl.col("sales_rank_category"),
        ),
    ]
    for relation in ("also_bought", "also_viewed", "bought_together"):
        related = items.select("item_idx", pl.col(relation).alias("other_id")).explode("other_id")
        kept = related.join(idx, on="other_id").filter(pl.col("other_idx") != pl.col("item_idx"))
        out.append(
            forward_edges(
                kept, item_key(pl.col("item_idx")), relation, item_key(pl.col("other_idx"))
            )
        )
    return out


def user_attribute_edges(sequences: pl.DataFrame, users: pl.DataFrame) -> list[pl.DataFrame]:
    known = sequences.select("user_idx", "user_id").unique().join(users, on="user_id")
    age = pl.lit(None, pl.String)
    for bound, label in reversed(AGE_GROUPS):
        age = pl.when(pl.col("age") < bound).then(pl.lit(label)).otherwise(age)
    head = user_key(pl.col("user_idx"))
    return [
        forward_edges(known.drop_nulls("age"), head, "has_age_group", pl.lit("age_group:") + age),
        forward_edges(known, head, "has_gender", pl.lit("gender:") + pl.col("gender")),
        forward_edges(known, head, "has_occupation", pl.lit("occupation:") + pl.col("occupation")),
    ]
