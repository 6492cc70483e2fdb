"""The relation schema: every relation typed (head and tail node types), directed, with its
inverse, its family and the label a person reads.

Apart from the builders because more than the graph reads it: the prompts phrase a path through
these labels (`core.llm.prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass


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
        # No public source has studios: benchmarks/quality/planted.py plants them to test the chain
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
