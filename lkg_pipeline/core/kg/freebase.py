"""Freebase-like facts (RecBole's ml-100k.kg, and the planted-signal benchmark's studio): which
raw relations are read and in which direction, their item → entity edges, and names for their
nodes, which have only a MID.
"""

from __future__ import annotations

import polars as pl

from lkg_pipeline.core.kg.edges import forward_edges, item_key
from lkg_pipeline.core.kg.relations import RELATIONS

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
        forward_edges(
            sequels, item_key(pl.col("item_idx")), "has_sequel", item_key(pl.col("other_idx"))
        )
    )
    for relation in ENTITY_NOUNS:
        subset = facts.filter(pl.col("relation") == relation)
        out.append(
            forward_edges(
                subset,
                item_key(pl.col("item_idx")),
                relation,
                pl.lit(f"{RELATIONS[relation].tail_type}:") + pl.col("other"),
            )
        )
    return out, dict(unmapped.iter_rows())


def attribute_names(edges: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Names for Freebase nodes, which have only a MID: "director of Heat (1995)" (+N more).

    The role is the node's most frequent one (ties: by name), and the item shown is the
    most-rated item in training (ties: lower index) among those it has that role in, so the
    name is stable, refers to a film people know, and is true: a person who acted in most of
    their films and directed the most popular one is not "actor of" that one.
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
    ranked = fb.join(popularity, on="head_key")
    role = (
        ranked.group_by("tail_key", "relation")
        .agg(films=pl.col("head_key").n_unique())
        .sort(["tail_key", "films", "relation"], descending=[False, True, False])
        .group_by("tail_key", maintain_order=True)
        .first()
        .select("tail_key", "relation")
    )
    per_node = (
        ranked.join(role, on=["tail_key", "relation"])
        .sort(["tail_key", "pop", "item_idx"], descending=[False, True, False])
        .group_by("tail_key", maintain_order=True)
        .agg(relation=pl.col("relation").first(), title=pl.col("title").first())
        .join(ranked.group_by("tail_key").agg(n=pl.col("head_key").n_unique()), on="tail_key")
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
