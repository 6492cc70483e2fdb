"""From raw interactions to clean items and leave-one-out user sequences.

The order of every step is fixed and documented because each one changes what the evaluation
measures: which items survive, which id an item gets, and which of two same-second ratings is
the test item.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from lkg_pipeline.core.data.ingest import ITEM_COLUMNS, conform

# RecBole writes the ML-100K placeholder item as "unkonwn", GroupLens as "unknown": not a title.
PLACEHOLDER_TITLES = frozenset({"unknown", "unkonwn"})
# Articles that MovieLens moves to the end ("Usual Suspects, The"), in the languages it uses.
ARTICLES = (
    "The",
    "A",
    "An",
    "La",
    "Le",
    "Les",
    "L'",
    "Il",
    "Lo",
    "I",
    "Gli",
    "Die",
    "Der",
    "Das",
    "El",
    "Los",
    "Las",
    "Det",
    "Den",
    "De",
    "Un",
    "Une",
    "O",
    "Os",
)
_YEAR_TAIL = re.compile(r"\s*\(\d{4}(?:[-–]\d{0,4})?\)\s*$")
# A parenthesised part after the main title is an alternate ("Seven (Se7en)"); one that opens
# the title is part of it ("(500) Days of Summer").
_PARENTHESISED = re.compile(r"(?<=\S)\s+\([^()]*\)")
_TRAILING_ARTICLE = re.compile(
    r"^(?P<body>.+?),\s*(?P<article>" + "|".join(re.escape(a) for a in ARTICLES) + r")$"
)

SPLITS = ("train", "val", "test")


class EmptyPreparationError(ValueError):
    """A step of preparation left no interaction: stopped before anything is written, so good
    tables are never replaced by empty ones that every later check would pass vacuously."""


def clean_title(
    title: str | None, year: int | None = None, drop_placeholders: bool = True
) -> str | None:
    """The title prompts show: "Usual Suspects, The (1995)" → "The Usual Suspects (1995)".

    Like the reference: the year and parenthesised alternates ("Seven (Se7en)") are removed and a
    trailing article is moved to the front; unlike it, every article MovieLens uses is handled,
    accents are kept, and the year is put back from its own column so that RecBole's layout
    (no year in the title) and GroupLens' (year in the title) give the same text.
    """
    if title is None:
        return None
    text = " ".join(title.split())
    if not text or (drop_placeholders and text.lower() in PLACEHOLDER_TITLES):
        return None
    if text.lower() in PLACEHOLDER_TITLES:  # kept: one spelling for both ML-100K layouts
        text = "unknown"
    text = _YEAR_TAIL.sub("", text)
    without_alternates = _PARENTHESISED.sub("", text).strip()
    text = without_alternates or text  # a title that is all parentheses stays as it is
    match = _TRAILING_ARTICLE.match(text)
    if match:
        article, body = match["article"], match["body"]
        text = f"{article}{body}" if article.endswith("'") else f"{article} {body}"
    return f"{text} ({year})" if year is not None else text


def clean_product_title(
    title: str | None, year: int | None = None, drop_placeholders: bool = True
) -> str | None:
    """An Amazon title as the catalogue has it, whitespace runs collapsed, nothing else.

    MovieLens' rules would damage product names ("Face Wash (Oil-Free)" is not an alternate
    title, "Soap, The" not a moved article); HTML entities are decoded at ingest. `year` and
    `drop_placeholders` are accepted for a common signature and ignored (products have no year,
    and no placeholder item).
    """
    if title is None:
        return None
    return " ".join(title.split()) or None


# (title, year, drop_placeholders) → the title prompts show, or None when it has none usable.
TitleCleaner = Callable[[str | None, int | None, bool], str | None]
# Title rules by source: which cleaner a dataset's titles go through.
TITLE_CLEANERS: dict[str, TitleCleaner] = {"movielens": clean_title, "amazon": clean_product_title}
TITLE_STYLES: dict[str, str] = {
    "ml-100k": "movielens",
    "ml-latest-small": "movielens",
    "beauty": "amazon",
}


@dataclass(frozen=True)
class PrepareConfig:
    min_user_interactions: int = 5  # k-core threshold for users (the paper's 5-core)
    min_item_interactions: int = 5  # k-core threshold for items
    min_rating: float | None = None  # keep only ratings ≥ this (None: all, as the reference)
    # Drop ML-100K's placeholder item ("unknown": no title, no date). Keeping it reproduces the
    # usual 5-core figures (99,287 interactions, 1,349 items) but shows "unknown" to the LLM.
    drop_placeholder_titles: bool = True
    # A seeded sample of this many users (before the k-core) for quick runs and CI; None: all.
    max_users: int | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        if self.max_users is not None and self.max_users < 1:
            raise ValueError(f"max_users={self.max_users} must be ≥ 1, or None (all users)")
        if self.min_user_interactions < 3:
            raise ValueError(
                f"min_user_interactions={self.min_user_interactions}: leave-one-out needs at least "
                "3 interactions per user (train, val, test)"
            )
        if self.min_item_interactions < 1:
            raise ValueError(f"min_item_interactions={self.min_item_interactions} must be ≥ 1")


@dataclass
class Prepared:
    items: pl.DataFrame
    sequences: pl.DataFrame
    stats: dict[str, float | int] = field(default_factory=dict)


def k_core(interactions: pl.DataFrame, min_user: int, min_item: int) -> tuple[pl.DataFrame, int]:
    """Iteratively drop users and items below their thresholds until none is; also the rounds."""
    rounds = 0
    while True:
        rounds += 1
        users = interactions.group_by("user_id").len().filter(pl.col("len") >= min_user)
        items = interactions.group_by("item_id").len().filter(pl.col("len") >= min_item)
        kept = interactions.filter(
            pl.col("user_id").is_in(users["user_id"].implode())
            & pl.col("item_id").is_in(items["item_id"].implode())
        )
        if kept.height == interactions.height:
            return kept, rounds
        interactions = kept


def prepare(
    raw_interactions: pl.DataFrame,
    raw_items: pl.DataFrame,
    config: PrepareConfig,
    *,
    title_style: str,
) -> Prepared:
    """Clean items, k-core, dense ids and the leave-one-out split, in that order.

    - Titles are cleaned by the source's rules (`title_style`: a key of `TITLE_CLEANERS`;
      `TITLE_STYLES` gives each dataset's).
    - Items without a usable title are dropped before the k-core (they cannot be shown to the LLM),
      and so are ratings of items the catalogue does not have (counted in the stats).
    - A step that leaves no interaction raises `EmptyPreparationError` saying which step and why.
    - A (user, item) pair rated more than once keeps its earliest rating.
    - Ids are dense and follow the sorted original ids (0 = smallest), never hash or set order.
    - A user's items are ordered by timestamp, ties broken by original item id ascending; the last
      is test, the second-to-last val, the rest train.
    """
    clean = _title_cleaner(title_style)
    _require_input(raw_interactions, raw_items)
    raw_items = conform(raw_items, {"item_id": raw_items.schema["item_id"], **ITEM_COLUMNS})
    items, titles = _titled_items(raw_items, clean, config.drop_placeholder_titles)
    known, inter = _on_titled_items(raw_interactions, raw_items, items)
    n_titled = inter.height
    inter = _sample_users(inter, config.max_users, config.seed)
    inter = _rated_at_least(inter, config.min_rating)
    inter, duplicates = _first_rating_per_pair(inter)
    inter, rounds = _k_core_or_raise(inter, config)
    user_map = _dense(inter["user_id"], "user_id", "user_idx")
    item_map = _dense(inter["item_id"], "item_id", "item_idx")
    sequences = _leave_one_out(inter, user_map, item_map)
    items = _item_table(items, item_map, sequences)
    return Prepared(
        items,
        sequences,
        sequence_stats(sequences)
        | {
            "raw_interactions": raw_interactions.height,
            "raw_items": raw_items.height,
            "items_without_title": sum(t is None for t in titles),
            "interactions_unknown_item": raw_interactions.height - known.height,
            "interactions_untitled_item": known.height - n_titled,
            "duplicate_pairs_dropped": duplicates,
            "k_core_rounds": rounds,
        },
    )


def _title_cleaner(title_style: str) -> TitleCleaner:
    """The title rules of `title_style` (a key of `TITLE_CLEANERS`)."""
    if title_style not in TITLE_CLEANERS:
        raise ValueError(
            f"Unknown title_style {title_style!r}; choose one of {', '.join(TITLE_CLEANERS)}."
        )
    return TITLE_CLEANERS[title_style]


def _require_input(raw_interactions: pl.DataFrame, raw_items: pl.DataFrame) -> None:
    if raw_interactions.is_empty() or raw_items.is_empty():
        raise EmptyPreparationError(
            f"Nothing to prepare: {raw_interactions.height} raw interactions, "
            f"{raw_items.height} raw items."
        )


def _titled_items(
    raw_items: pl.DataFrame, clean: TitleCleaner, drop_placeholders: bool
) -> tuple[pl.DataFrame, list[str | None]]:
    """Items with a usable cleaned title (the raw one kept as `raw_title`), first row per id;
    also every raw item's cleaned title (None: unusable)."""
    titles = [
        clean(t, y, drop_placeholders)
        for t, y in zip(raw_items["title"].to_list(), raw_items["year"].to_list())
    ]
    items = (
        raw_items.with_columns(title=pl.Series(titles, dtype=pl.String), raw_title=pl.col("title"))
        .filter(pl.col("title").is_not_null())
        .unique("item_id", keep="first", maintain_order=True)
    )
    return items, titles


def _on_titled_items(
    raw_interactions: pl.DataFrame, raw_items: pl.DataFrame, items: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(interactions on catalogue items, interactions on titled items); raises when the latter
    is empty."""
    known = raw_interactions.filter(pl.col("item_id").is_in(raw_items["item_id"].implode()))
    inter = known.filter(pl.col("item_id").is_in(items["item_id"].implode()))
    if inter.is_empty():
        raise EmptyPreparationError(
            f"No interaction is left once items without a usable title are dropped: "
            f"{raw_interactions.height:,} raw interactions, {known.height:,} of them on "
            f"catalogue items; {raw_items.height:,} raw items, {items.height:,} with a title. "
            "The ratings and the item file do not belong together, or no item has a title."
        )
    return known, inter


def _sample_users(inter: pl.DataFrame, max_users: int | None, seed: int) -> pl.DataFrame:
    """A seeded sample of `max_users` users (drawn from the sorted user ids); None: all."""
    if max_users is not None:
        users = inter["user_id"].unique().sort()
        if users.len() > max_users:
            kept_users = users.sample(n=max_users, seed=seed)
            inter = inter.filter(pl.col("user_id").is_in(kept_users.implode()))
    return inter


def _rated_at_least(inter: pl.DataFrame, min_rating: float | None) -> pl.DataFrame:
    if min_rating is not None:
        inter = inter.filter(pl.col("rating") >= min_rating)
        if inter.is_empty():
            raise EmptyPreparationError(f"No interaction has a rating >= min_rating={min_rating}.")
    return inter


def _first_rating_per_pair(inter: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """The earliest rating of each (user, item) pair (of two in the same second, the higher:
    a rule on the values, so the file's row order cannot change the result), and how many
    later ones were dropped."""
    n_before_dedup = inter.height
    inter = inter.sort(
        "user_id", "item_id", "timestamp", "rating", descending=[False, False, False, True]
    ).unique(["user_id", "item_id"], keep="first", maintain_order=True)
    duplicates = n_before_dedup - inter.height
    return inter, duplicates


def _k_core_or_raise(inter: pl.DataFrame, config: PrepareConfig) -> tuple[pl.DataFrame, int]:
    """`k_core` at the config's thresholds; raises, with the sizes before it, when it leaves
    nothing."""
    before_core = inter
    inter, rounds = k_core(inter, config.min_user_interactions, config.min_item_interactions)
    if inter.is_empty():
        per_user = before_core.group_by("user_id").len()["len"]
        per_item = before_core.group_by("item_id").len()["len"]
        raise EmptyPreparationError(
            f"Nothing is left after the k-core (min_user_interactions="
            f"{config.min_user_interactions}, min_item_interactions="
            f"{config.min_item_interactions}): before it, {before_core.height:,} interactions "
            f"by {per_user.len():,} users on {per_item.len():,} items (at most {per_user.max()} "
            f"per user, {per_item.max()} per item). Lower the thresholds or use more data."
        )
    return inter, rounds


def _leave_one_out(
    inter: pl.DataFrame, user_map: pl.DataFrame, item_map: pl.DataFrame
) -> pl.DataFrame:
    """The sequences table: dense ids, each user's items in (timestamp, item id) order with
    their position, the last test, the one before val, the rest train."""
    return (
        inter.join(user_map, on="user_id")
        .join(item_map, on="item_id")
        .sort("user_idx", "timestamp", "item_idx")  # item_idx order == original id order
        .with_columns(position=pl.int_range(pl.len()).over("user_idx").cast(pl.Int32))
        .with_columns(
            split=pl.when(pl.col("position") == pl.len().over("user_idx") - 1)
            .then(pl.lit("test"))
            .when(pl.col("position") == pl.len().over("user_idx") - 2)
            .then(pl.lit("val"))
            .otherwise(pl.lit("train"))
        )
        .select(
            "user_idx", "item_idx", "user_id", "item_id", "rating", "timestamp", "position", "split"
        )
    )


def _item_table(
    items: pl.DataFrame, item_map: pl.DataFrame, sequences: pl.DataFrame
) -> pl.DataFrame:
    """The kept items by dense id, with their interaction counts (all, and train only)."""
    counts = sequences.group_by("item_idx").agg(
        n_interactions=pl.len().cast(pl.Int32),
        n_train_interactions=(pl.col("split") == "train").sum().cast(pl.Int32),
    )
    return (
        items.join(item_map, on="item_id")
        .join(counts, on="item_idx")
        .sort("item_idx")
        .select(
            "item_idx",
            "item_id",
            "title",
            "raw_title",
            *[c for c in ITEM_COLUMNS if c != "title"],
            "n_interactions",
            "n_train_interactions",
        )
    )


def _dense(ids: pl.Series, name: str, index: str) -> pl.DataFrame:
    unique = ids.unique().sort()
    return pl.DataFrame(
        {name: unique, index: pl.int_range(len(unique), eager=True, dtype=pl.Int32)}
    )


def sequence_stats(sequences: pl.DataFrame) -> dict[str, float | int]:
    lengths = sequences.group_by("user_idx").len()["len"]
    users, items = sequences["user_idx"].n_unique(), sequences["item_idx"].n_unique()
    return {
        "users": users,
        "items": items,
        "interactions": sequences.height,
        "density": sequences.height / (users * items) if users and items else 0.0,
        "mean_sequence_length": float(lengths.mean() or 0.0),
        "median_sequence_length": float(lengths.median() or 0.0),
        "min_sequence_length": int(lengths.min() or 0),
        "max_sequence_length": int(lengths.max() or 0),
        **{f"{s}_interactions": int((sequences["split"] == s).sum()) for s in SPLITS},
        "users_with_tied_last_two": tied_last_two(sequences),
    }


def tied_last_two(sequences: pl.DataFrame) -> int:
    """Users whose val and test items share a timestamp: the tie-break decides their split."""
    last = (
        sequences.filter(pl.col("split") != "train")
        .group_by("user_idx")
        .agg(pl.col("timestamp").n_unique().alias("distinct"))
    )
    return int((last["distinct"] == 1).sum())
