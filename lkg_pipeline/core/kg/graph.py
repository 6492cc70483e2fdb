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

import duckdb
import polars as pl


@dataclass(frozen=True)
class Relation:
    name: str
    inverse: str
    head_type: str
    tail_type: str
    family: str  # behaviour | item_attribute | item_item | user_attribute
    label: str  # how a person reads "head <label> tail"


def _pair(
    name: str, inverse: str, head: str, tail: str, family: str, label: str, inverse_label: str
) -> list[Relation]:
    forward = Relation(name, inverse, head, tail, family, label)
    if name == inverse:
        return [forward]
    return [forward, Relation(inverse, name, tail, head, family, inverse_label)]


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in [
        *_pair("rated", "rated_by", "user", "item", "behaviour", "rated", "was rated by"),
        *_pair("co_rated", "co_rated", "item", "item", "behaviour", "is often rated with", ""),
        *_pair(
            "has_genre",
            "genre_of",
            "item",
            "genre",
            "item_attribute",
            "has genre",
            "is the genre of",
        ),
        *_pair(
            "released_in",
            "release_year_of",
            "item",
            "year",
            "item_attribute",
            "was released in",
            "is the release year of",
        ),
        *_pair(
            "directed_by",
            "directed",
            "item",
            "person",
            "item_attribute",
            "was directed by",
            "directed",
        ),
        *_pair("starring", "acted_in", "item", "person", "item_attribute", "stars", "acted in"),
        *_pair(
            "written_by", "wrote", "item", "person", "item_attribute", "was written by", "wrote"
        ),
        *_pair(
            "produced_by",
            "produced",
            "item",
            "person",
            "item_attribute",
            "was produced by",
            "produced",
        ),
        *_pair(
            "shot_by",
            "shot",
            "item",
            "person",
            "item_attribute",
            "was shot by",
            "was the cinematographer of",
        ),
        *_pair(
            "made_by_company",
            "company_made",
            "item",
            "company",
            "item_attribute",
            "was made by",
            "made",
        ),
        # No public source has studios: benchmarks/planted.py plants them to test the chain
        *_pair(
            "made_at_studio",
            "studio_made",
            "item",
            "studio",
            "item_attribute",
            "was made at",
            "made",
        ),
        *_pair(
            "in_language",
            "language_of",
            "item",
            "language",
            "item_attribute",
            "is in",
            "is the language of",
        ),
        *_pair(
            "from_country",
            "country_of",
            "item",
            "country",
            "item_attribute",
            "is from",
            "is the country of",
        ),
        *_pair(
            "content_rated",
            "content_rating_of",
            "item",
            "content_rating",
            "item_attribute",
            "is rated",
            "is the content rating of",
        ),
        *_pair(
            "about_subject",
            "subject_of",
            "item",
            "subject",
            "item_attribute",
            "is about",
            "is the subject of",
        ),
        *_pair(
            "nominated_for",
            "nomination_of",
            "item",
            "award",
            "item_attribute",
            "was nominated for",
            "was a nomination of",
        ),
        *_pair("won_award", "award_of", "item", "award", "item_attribute", "won", "was won by"),
        *_pair(
            "freebase_genre",
            "freebase_genre_of",
            "item",
            "genre",
            "item_attribute",
            "has genre",
            "is the genre of",
        ),
        *_pair(
            "has_sequel",
            "sequel_of",
            "item",
            "item",
            "item_item",
            "has the sequel",
            "is the sequel of",
        ),
        *_pair("tagged", "tag_of", "item", "tag", "item_attribute", "is tagged", "is a tag of"),
        *_pair("has_brand", "brand_of", "item", "brand", "item_attribute", "is made by", "makes"),
        *_pair(
            "in_category",
            "category_of",
            "item",
            "category",
            "item_attribute",
            "is in category",
            "is a category of",
        ),
        *_pair(
            "has_category_path",
            "category_path_of",
            "item",
            "category_path",
            "item_attribute",
            "is filed under",
            "is the category path of",
        ),
        *_pair(
            "ranked_in",
            "sales_rank_category_of",
            "item",
            "sales_rank_category",
            "item_attribute",
            "is ranked in",
            "is the sales-rank category of",
        ),
        *_pair(
            "also_bought",
            "also_bought_from",
            "item",
            "item",
            "item_item",
            "is often bought with",
            "is listed as also-bought on",
        ),
        *_pair(
            "also_viewed",
            "also_viewed_from",
            "item",
            "item",
            "item_item",
            "is often viewed with",
            "is listed as also-viewed on",
        ),
        *_pair(
            "bought_together",
            "bought_together_from",
            "item",
            "item",
            "item_item",
            "is bought together with",
            "is listed as bought-together on",
        ),
        *_pair(
            "has_age_group",
            "age_group_of",
            "user",
            "age_group",
            "user_attribute",
            "is aged",
            "is the age group of",
        ),
        *_pair(
            "has_gender", "gender_of", "user", "gender", "user_attribute", "is", "is the gender of"
        ),
        *_pair(
            "has_occupation",
            "occupation_of",
            "user",
            "occupation",
            "user_attribute",
            "works as",
            "is the occupation of",
        ),
    ]
}

# Freebase relation (RecBole's ml-100k.kg) → (our relation, True if the film is the head).
# The file holds most facts in both directions; each is read once, film first.
FREEBASE_RELATIONS: dict[str, tuple[str, bool]] = {
    "film.film.actor": ("starring", True),
    "film.actor.film": ("starring", False),
    "film.film.directed_by": ("directed_by", True),
    "film.director.film": ("directed_by", False),
    "film.film.written_by": ("written_by", True),
    "film.writer.film": ("written_by", False),
    "film.film.produced_by": ("produced_by", True),
    "film.producer.film": ("produced_by", False),
    "film.film.cinematography": ("shot_by", True),
    "film.cinematographer.film": ("shot_by", False),
    "film.film.production_companies": ("made_by_company", True),
    "film.production_company.films": ("made_by_company", False),
    "film.film.language": ("in_language", True),
    "film.film.country": ("from_country", True),
    "film.film.rating": ("content_rated", True),
    "film.content_rating.film": ("content_rated", False),
    "film.film.subjects": ("about_subject", True),
    "film.film_subject.films": ("about_subject", False),
    "film.film.award_nomination": ("nominated_for", True),
    "film.film.award_won": ("won_award", True),
    "film.film.genre": ("freebase_genre", True),
    "film.film_genre.films_in_this_genre": ("freebase_genre", False),
    "film.film.sequel": ("has_sequel", True),
    "lkg.film.studio": ("made_at_studio", True),  # not Freebase: the planted-signal benchmark's
    "film.film.prequel": ("has_sequel", False),
}
# What a Freebase node is called, through the items it connects ("director of Heat (1995)").
ENTITY_NOUNS = {
    "directed_by": "director",
    "starring": "actor",
    "written_by": "writer",
    "produced_by": "producer",
    "shot_by": "cinematographer",
    "made_by_company": "company",
    "made_at_studio": "studio",
    "in_language": "language",
    "from_country": "country",
    "content_rated": "content rating",
    "about_subject": "subject",
    "nominated_for": "award nomination",
    "won_award": "award",
    "freebase_genre": "genre",
}
AGE_GROUPS = (
    (18, "under 18"),
    (25, "18-24"),
    (35, "25-34"),
    (45, "35-44"),
    (50, "45-49"),
    (56, "50-55"),
    (1000, "56+"),
)

ENTITY_SCHEMA = {"entity_id": pl.Int64, "type": pl.String, "key": pl.String, "name": pl.String}
TRIPLE_SCHEMA = {
    "head": pl.Int64,
    "relation": pl.String,
    "tail": pl.Int64,
    "weight": pl.Float64,
    "rating": pl.Float32,
    "timestamp": pl.Int64,
}
# Forward edges before ids are assigned: node keys are "<type>:<value>".
EDGE_SCHEMA = {
    "head_key": pl.String,
    "relation": pl.String,
    "tail_key": pl.String,
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
        assert self.co_rated_top_n >= 0, f"co_rated_top_n={self.co_rated_top_n} must be ≥ 0"


@dataclass
class KnowledgeGraph:
    entities: pl.DataFrame  # ENTITY_SCHEMA + item_idx / user_idx where the node is one
    triples: pl.DataFrame  # TRIPLE_SCHEMA, both directions, sorted by (head, relation, tail)
    relations: pl.DataFrame  # one row per Relation present
    unmapped_relations: dict[str, int]  # Freebase relations we do not read, with counts


def item_key(idx: pl.Expr) -> pl.Expr:
    return pl.lit("item:") + idx.cast(pl.String)


def user_key(idx: pl.Expr) -> pl.Expr:
    return pl.lit("user:") + idx.cast(pl.String)


def _edges(
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
    return _edges(pairs, item_key(pl.col("i")), "co_rated", item_key(pl.col("j")), pl.col("w"))


def movielens_edges(items: pl.DataFrame) -> list[pl.DataFrame]:
    genres = items.select("item_idx", "genres").explode("genres").drop_nulls("genres")
    return [
        _edges(
            genres, item_key(pl.col("item_idx")), "has_genre", pl.lit("genre:") + pl.col("genres")
        ),
        _edges(
            items.drop_nulls("year"),
            item_key(pl.col("item_idx")),
            "released_in",
            pl.lit("year:") + pl.col("year").cast(pl.String),
        ),
    ]


def freebase_edges(
    items: pl.DataFrame,
    links: pl.DataFrame,
    triples: pl.DataFrame,
) -> tuple[list[pl.DataFrame], dict[str, int]]:
    """Film facts oriented film → entity; only films that are kept items take part."""
    mids = links.join(items.select("item_id", "item_idx"), on="item_id").select(
        "entity_id", "item_idx"
    )
    mapping = pl.DataFrame(
        [(k, v[0], v[1]) for k, v in FREEBASE_RELATIONS.items()],
        schema={"raw": pl.String, "relation": pl.String, "film_is_head": pl.Boolean},
        orient="row",
    )
    joined = triples.join(mapping, left_on="relation", right_on="raw", how="left")
    unmapped = joined.filter(pl.col("relation_right").is_null()).group_by("relation").len()
    facts = (
        joined.drop_nulls("relation_right")
        .select(
            film=pl.when("film_is_head").then("head").otherwise("tail"),
            other=pl.when("film_is_head").then("tail").otherwise("head"),
            relation=pl.col("relation_right"),
        )
        .join(mids, left_on="film", right_on="entity_id")
    )
    out = []
    sequels = facts.filter(pl.col("relation") == "has_sequel").join(
        mids.rename({"item_idx": "other_idx"}), left_on="other", right_on="entity_id"
    )
    out.append(
        _edges(sequels, item_key(pl.col("item_idx")), "has_sequel", item_key(pl.col("other_idx")))
    )
    for relation in ENTITY_NOUNS:
        subset = facts.filter(pl.col("relation") == relation)
        out.append(
            _edges(
                subset,
                item_key(pl.col("item_idx")),
                relation,
                pl.lit(f"{RELATIONS[relation].tail_type}:") + pl.col("other"),
            )
        )
    return out, dict(unmapped.iter_rows())


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
    return _edges(
        usable, item_key(pl.col("item_idx")), "tagged", pl.lit("tag:") + pl.col("tag"), pl.col("w")
    )


def amazon_edges(items: pl.DataFrame) -> list[pl.DataFrame]:
    idx = items.select(
        pl.col("item_id").cast(pl.String).alias("other_id"), pl.col("item_idx").alias("other_idx")
    )
    paths = items.select("item_idx", "categories").explode("categories").drop_nulls("categories")
    levels = paths.explode("categories").drop_nulls("categories")
    out = [
        _edges(
            items.drop_nulls("brand"),
            item_key(pl.col("item_idx")),
            "has_brand",
            pl.lit("brand:") + pl.col("brand"),
        ),
        _edges(
            levels,
            item_key(pl.col("item_idx")),
            "in_category",
            pl.lit("category:") + pl.col("categories"),
        ),
        _edges(
            paths.filter(pl.col("categories").list.len() > 0),
            item_key(pl.col("item_idx")),
            "has_category_path",
            pl.lit("category_path:") + pl.col("categories").list.join(" > "),
        ),
        _edges(
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
            _edges(kept, item_key(pl.col("item_idx")), relation, item_key(pl.col("other_idx")))
        )
    return out


def user_attribute_edges(sequences: pl.DataFrame, users: pl.DataFrame) -> list[pl.DataFrame]:
    known = sequences.select("user_idx", "user_id").unique().join(users, on="user_id")
    age = pl.lit(None, pl.String)
    for bound, label in reversed(AGE_GROUPS):
        age = pl.when(pl.col("age") < bound).then(pl.lit(label)).otherwise(age)
    head = user_key(pl.col("user_idx"))
    return [
        _edges(known.drop_nulls("age"), head, "has_age_group", pl.lit("age_group:") + age),
        _edges(known, head, "has_gender", pl.lit("gender:") + pl.col("gender")),
        _edges(known, head, "has_occupation", pl.lit("occupation:") + pl.col("occupation")),
    ]


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
    names = _attribute_names(edges, items)
    others = others.join(names, on="key", how="left").select(
        entity_id=(pl.int_range(pl.len()) + n_items + users.height).cast(pl.Int64),
        type=pl.col("type"),
        key=pl.col("key"),
        name=pl.coalesce(pl.col("derived_name"), pl.col("value")),
        item_idx=pl.lit(None, pl.Int32),
        user_idx=pl.lit(None, pl.Int32),
    )
    return pl.concat([item_nodes, user_nodes, others])


def _attribute_names(edges: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Names for Freebase nodes, which have only a MID: "director of Heat (1995)" (+N more).

    The item shown is the node's most-rated item in training (ties: lower index), so the name
    is stable and refers to a film people know.
    """
    fb = edges.filter(pl.col("relation").is_in(list(ENTITY_NOUNS)))
    if fb.is_empty():
        return pl.DataFrame(schema={"key": pl.String, "derived_name": pl.String})
    popularity = items.select(
        head_key=item_key(pl.col("item_idx")),
        title=pl.col("title"),
        pop=pl.col("n_train_interactions"),
        item_idx=pl.col("item_idx"),
    )
    ranked = fb.join(popularity, on="head_key").sort(
        ["tail_key", "pop", "item_idx"], descending=[False, True, False]
    )
    per_node = ranked.group_by("tail_key", maintain_order=True).agg(
        relation=pl.col("relation").mode().sort().first(),
        title=pl.col("title").first(),
        n=pl.col("head_key").n_unique(),
    )
    nouns = pl.col("relation").replace_strict(ENTITY_NOUNS)
    more = (
        pl.when(pl.col("n") > 1)
        .then(pl.lit(" and ") + (pl.col("n") - 1).cast(pl.String) + pl.lit(" more"))
        .otherwise(pl.lit(""))
    )
    return per_node.select(
        key=pl.col("tail_key"), derived_name=nouns + pl.lit(" of ") + pl.col("title") + more
    )


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
