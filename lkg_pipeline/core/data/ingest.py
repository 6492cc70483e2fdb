"""Readers that turn each dataset's native files into one raw schema.

Every dataset ends up as the same frames (`raw_schemas`), so preparation and the knowledge
graph never branch on the source format. Ids keep their native type: integers for MovieLens,
strings (ASINs, reviewer ids) for Amazon; everything else is typed identically.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from lkg_pipeline.core.data.parsing import (
    LINE,
    Column,
    EmptyInputError,
    MalformedInputError,
    ParseIssue,
    ParseReport,
    iter_literal_lines,
    read_delimited,
)
from lkg_pipeline.core.data.sources import RawFile, SourceTree, SourceUnavailableError, require

# GroupLens ML-100K `u.item`: the 19 genre flags, in file order.
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

STR_LIST = pl.List(pl.String)
ITEM_COLUMNS: dict[str, pl.DataType] = {
    "title": pl.String,
    "year": pl.Int32,
    "genres": STR_LIST,
    "brand": pl.String,
    "categories": pl.List(STR_LIST),  # Amazon: several category paths, root first
    "also_bought": STR_LIST,
    "also_viewed": STR_LIST,
    "bought_together": STR_LIST,
    "sales_rank_category": pl.String,
    "sales_rank": pl.Int64,
    "price": pl.Float64,
}
USER_COLUMNS: dict[str, pl.DataType] = {
    "age": pl.Int32,
    "gender": pl.String,
    "occupation": pl.String,
    "zip_code": pl.String,
}


def interaction_columns(id_type: pl.DataType) -> list[Column]:
    """user, item, rating, timestamp: the field order of every ratings file we read."""
    return [
        Column("user_id", id_type),
        Column("item_id", id_type),
        Column("rating", pl.Float32),
        Column("timestamp", pl.Int64),
    ]


ML100K_USER_COLUMNS = [
    Column("user_id", pl.Int64),
    Column("age", pl.Int32),
    Column("gender", pl.String),
    Column("occupation", pl.String),
    Column("zip_code", pl.String, required=False),
]


def raw_schemas(id_type: pl.DataType) -> dict[str, dict[str, pl.DataType]]:
    """The schema of every raw frame for a dataset whose native ids have type `id_type`."""
    return {
        "interactions": {
            "user_id": id_type,
            "item_id": id_type,
            "rating": pl.Float32,
            "timestamp": pl.Int64,
        },
        "items": {"item_id": id_type, **ITEM_COLUMNS},
        "users": {"user_id": id_type, **USER_COLUMNS},
        "tags": {"user_id": id_type, "item_id": id_type, "tag": pl.String, "timestamp": pl.Int64},
        "entity_links": {"item_id": id_type, "entity_id": pl.String},
        "entity_triples": {"head": pl.String, "relation": pl.String, "tail": pl.String},
    }


# Ratings naming an item the catalogue lacks, tolerated up to this share of a ratings file: a
# few are a stale catalogue, many mean the two files do not belong together.
MAX_UNKNOWN_ITEM_SHARE = 0.01


class CatalogueMismatchError(ValueError):
    """Too many ratings name items that the item file does not have."""


@dataclass
class RawDataset:
    """One dataset's raw frames, where they came from, and what the parsers skipped."""

    dataset: str
    layout: str
    source: str
    frames: dict[str, pl.DataFrame]
    reports: list[ParseReport] = field(default_factory=list)
    interactions_file: str = ""  # the file `frames["interactions"]` was read from
    items_file: str = ""  # the file `frames["items"]` was read from
    unknown_item_ratings: int = 0  # ratings whose item the item file lacks (set by read_dataset)
    notes: list[str] = field(default_factory=list)  # what the reader did that a user must know

    @property
    def skipped_lines(self) -> int:
        return sum(len(r.issues) for r in self.reports)

    @property
    def files_read(self) -> list[str]:
        return [r.file for r in self.reports]


def conform(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """`frame` with exactly `schema`'s columns, in order; absent ones become typed nulls."""
    return frame.select(
        (pl.col(n) if n in frame.columns else pl.lit(None)).cast(t).alias(n)
        for n, t in schema.items()
    )


def _nonempty(frame: pl.DataFrame, report: ParseReport, what: str) -> pl.DataFrame:
    """`frame`, or an error naming the file when a file that must hold data kept no row."""
    if frame.is_empty():
        raise EmptyInputError(report, what)
    return frame


def _finish(
    dataset: str,
    layout: str,
    tree: SourceTree,
    id_type: pl.DataType,
    frames: dict[str, pl.DataFrame],
    reports: list[ParseReport],
    notes: list[str] | None = None,
) -> RawDataset:
    """The frames in the raw schema; by convention `reports[0]` is the ratings file and
    `reports[1]` the item file."""
    schemas = raw_schemas(id_type)
    out = {
        name: conform(frames[name], schema) if name in frames else pl.DataFrame(schema=schema)
        for name, schema in schemas.items()
    }
    first, second = reports[0].file, reports[1].file
    return RawDataset(dataset, layout, tree.label, out, reports, first, second, notes=notes or [])


# --- MovieLens-100K -------------------------------------------------------------------------


def read_ml_100k(
    tree: SourceTree, max_bad_lines: int = 0, movie_list: SourceTree | None = None
) -> RawDataset:
    """ML-100K from RecBole's atomic files if present, else from GroupLens' `u.*` files.

    `movie_list`: where RecBole's Freebase links find MovieLens movieIds (`links_to_items`),
    if not beside the files."""
    if tree.find("ml-100k.inter") is not None:
        return _read_ml_100k_recbole(tree, max_bad_lines, movie_list)
    if tree.find("u.data") is not None:
        raw = _read_ml_100k_grouplens(tree, max_bad_lines)
        if movie_list is not None:
            raw.notes.append(
                f"movie_list {movie_list.label} is not used: GroupLens' ml-100k layout has no "
                "Freebase links to map (RecBole's has: ml-100k.link, ml-100k.kg)."
            )
        return raw
    require(tree, "ml-100k", ["ml-100k.inter", "u.data"])  # raises, naming both layouts
    raise AssertionError("unreachable")


def _read_ml_100k_recbole(
    tree: SourceTree, max_bad_lines: int, movie_list: SourceTree | None
) -> RawDataset:
    files = require(tree, "ml-100k", ["ml-100k.inter", "ml-100k.item", "ml-100k.user"])
    tsv = {"separator": "\t", "max_bad_lines": max_bad_lines}
    inter, r1 = read_delimited(
        files["ml-100k.inter"],
        interaction_columns(pl.Int64),
        header=("user_id", "item_id", "rating", "timestamp"),
        **tsv,
    )
    inter = _nonempty(inter, r1, "ratings")
    items, r2 = read_delimited(
        files["ml-100k.item"],
        [
            Column("item_id", pl.Int64),
            Column("title", pl.String, required=False),
            Column("year", pl.String, required=False),
            Column("genres", pl.String, required=False),
        ],
        header=("item_id", "movie_title", "release_year", "class"),
        **tsv,
    )
    items = _nonempty(items, r2, "items")
    users, r3 = read_delimited(
        files["ml-100k.user"],
        ML100K_USER_COLUMNS,
        header=("user_id", "age", "gender", "occupation", "zip_code"),
        **tsv,
    )
    users = _nonempty(users, r3, "users")
    items = _split_title_year(
        items.with_columns(
            # RecBole writes its placeholder row as "unkonwn" in every field: a missing value.
            pl.col("year").cast(pl.Int32, strict=False),
            pl.col("genres").str.split(" ").list.filter(pl.element() != ""),
        )
    )
    frames = {"interactions": inter, "items": items, "users": users}
    reports, notes = [r1, r2, r3], []
    links, kg = tree.find("ml-100k.link"), tree.find("ml-100k.kg")
    if links is not None and kg is not None:
        frames["entity_links"], r4 = read_delimited(
            links,
            [
                Column("item_id", pl.Int64),
                Column("entity_id", pl.String),
            ],
            header=("item_id", "entity_id"),
            **tsv,
        )
        frames["entity_triples"], r5 = read_delimited(
            kg,
            [
                Column("head", pl.String),
                Column("relation", pl.String),
                Column("tail", pl.String),
            ],
            header=("head_id", "relation_id", "tail_id"),
            **tsv,
        )
        reports += [r4, r5]
        frames["entity_links"], note, r6 = links_to_items(
            frames["entity_links"], items, movie_list or tree, max_bad_lines, movie_list is None
        )
        reports += [r6] if r6 is not None else []
        notes.append(note)
    elif movie_list is not None:
        notes.append(
            f"movie_list {movie_list.label} is not used: the source has no Freebase links "
            "(ml-100k.link and ml-100k.kg)."
        )
    return _finish("ml-100k", "recbole", tree, pl.Int64, frames, reports, notes)


# RecBole's ml-100k.link names its films by MovieLens movieId (ML-1M's numbering, which later
# MovieLens releases keep: 296 is Pulp Fiction), not by ML-100K's item ids (56 is Pulp
# Fiction). Read as it is, every Freebase fact lands on another film: "Return of the Jedi has
# the sequel Flirt" (RUCAIBox/RecSysDatasets#130). A MovieLens movie list holding those ids
# and titles (ML-1M's movies.dat, or the movies.csv of ML-latest, ML-20M or ML-25M) beside
# the files, or named by the ingest config `movie_list`, translates them by title and year;
# without one, no link is kept.
MOVIE_LISTS = ("movies.dat", "movies.csv")


def links_to_items(
    links: pl.DataFrame,
    items: pl.DataFrame,
    tree: SourceTree,
    max_bad_lines: int = 0,
    optional: bool = True,
) -> tuple[pl.DataFrame, str, ParseReport | None]:
    """RecBole's links (movieId → MID) as ML-100K item ids, through a movie list in `tree`;
    what was done, in words; the list's parse report. Without a list in `tree` the links are
    set aside, or, unless `optional` (a list the user named), it is an error."""
    found = next(((n, f) for n in MOVIE_LISTS if (f := tree.find(n)) is not None), None)
    if found is None and not optional:
        raise SourceUnavailableError(
            f"movie_list {tree.label}: holds no MovieLens movie list ({' or '.join(MOVIE_LISTS)}"
            "; a file of another name is not read): give ML-1M's zip or movies.dat, or an "
            "ML-latest movies.csv"
        )
    if found is None:
        return (
            links.head(0),
            f"ml-100k.link: its {links.height:,} links are set aside: they name films by "
            "MovieLens movieId, not ML-100K item id, so read as they are every Freebase fact "
            "would describe another film. Put a MovieLens movie list with those ids "
            f"({' or '.join(MOVIE_LISTS)}) beside the files to map them by title and year.",
            None,
        )
    name, raw = found
    movies, report = read_movie_list(name, raw, max_bad_lines)
    ids = movie_ids_to_items(movies, items)
    mapped = links.join(ids, left_on="item_id", right_on="movie_id").select(
        item_id=pl.col("item_id_right"), entity_id="entity_id"
    )
    mapped = mapped.sort("item_id", "entity_id")
    return (
        mapped,
        f"ml-100k.link: {mapped.height:,} of {links.height:,} links mapped from MovieLens "
        f"movieId to ML-100K item id through {name} ({ids.height:,} of {items.height:,} "
        "items matched by title and year); the others are set aside.",
        report,
    )


def read_movie_list(
    name: str, raw: RawFile, max_bad_lines: int = 0
) -> tuple[pl.DataFrame, ParseReport]:
    """(movie_id, title, year) from ML-1M's `movies.dat` (`id::title::genres`, Latin-1) or a
    GroupLens `movies.csv`."""
    columns = [
        Column("movie_id", pl.Int64),
        Column("title", pl.String),
        Column("genres", pl.String, required=False),
    ]
    if name == "movies.csv":
        movies, report = read_delimited(
            raw, columns, separator=",", quoted=True, header=("movieId", "title", "genres"),
            encoding=("utf-8", "latin-1"), max_bad_lines=max_bad_lines,
        )  # fmt: skip
    else:  # "::" is no single-character separator; no title of ML-1M holds one
        text = raw.data.replace(b"::", b"\t")
        movies, report = read_delimited(
            RawFile(raw.label, text), columns, separator="\t",
            encoding=("utf-8", "latin-1"), max_bad_lines=max_bad_lines,
        )  # fmt: skip
    return _split_title_year(movies.select("movie_id", "title")), report


def movie_ids_to_items(movies: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """(movie_id, item_id) of the films whose title and year name one item on each side."""
    from lkg_pipeline.core.data.prepare import clean_title  # prepare imports this module

    def keyed(frame: pl.DataFrame, id_column: str) -> pl.DataFrame:
        keys = [
            (clean_title(title, None, drop_placeholders=False) or "").lower()
            for title in frame["title"].to_list()
        ]
        out = frame.select(id_column, "year").with_columns(key=pl.Series(keys, dtype=pl.String))
        out = out.filter((pl.col("key") != "") & pl.col("year").is_not_null())
        return out.filter(pl.len().over("key", "year") == 1)  # an ambiguous title maps nothing

    return (
        keyed(movies, "movie_id")
        .join(keyed(items, "item_id"), on=["key", "year"])
        .select("movie_id", "item_id")
        .sort("movie_id")
    )


def _read_ml_100k_grouplens(tree: SourceTree, max_bad_lines: int) -> RawDataset:
    files = require(tree, "ml-100k", ["u.data", "u.item", "u.user"])
    inter, r1 = read_delimited(
        files["u.data"],
        interaction_columns(pl.Int64),
        separator="\t",
        max_bad_lines=max_bad_lines,
    )
    inter = _nonempty(inter, r1, "ratings")
    item_columns = [
        Column("item_id", pl.Int64),
        Column("title", pl.String, required=False),
        Column("release_date", pl.String, required=False),
        Column("video_release_date", pl.String, required=False),
        Column("imdb_url", pl.String, required=False),
        *(Column(f"g{i}", pl.Int8) for i in range(len(ML100K_GENRES))),
    ]
    items, r2 = read_delimited(
        files["u.item"],
        item_columns,
        separator="|",
        # GroupLens ships Latin-1; a copy re-saved by an editor is UTF-8, which Latin-1 would
        # turn into mojibake without a single error. Valid UTF-8 is taken as UTF-8.
        encoding=("utf-8", "latin-1"),
        max_bad_lines=max_bad_lines,
    )
    items = _nonempty(items, r2, "items")
    users, r3 = read_delimited(
        files["u.user"],
        ML100K_USER_COLUMNS,
        separator="|",
        max_bad_lines=max_bad_lines,
    )
    users = _nonempty(users, r3, "users")
    flags = pl.concat_list(
        pl.when(pl.col(f"g{i}") == 1).then(pl.lit(g)) for i, g in enumerate(ML100K_GENRES)
    ).list.drop_nulls()
    items = items.with_columns(
        genres=flags,
        # "01-Jan-1995" → 1995; the title's own "(1995)" is split off later with the title.
        year=pl.col("release_date").str.slice(-4).cast(pl.Int32, strict=False),
    )
    items = _split_title_year(items)
    return _finish(
        "ml-100k",
        "grouplens",
        tree,
        pl.Int64,
        {
            "interactions": inter,
            "items": items,
            "users": users,
        },
        [r1, r2, r3],
    )


# "(1995)" or "(1995-1998)" anywhere in a title; GroupLens has "… (1995) (V)" for video releases.
TITLE_YEAR = r"\s*\((\d{4})(?:[-–]\d{0,4})?\)"


def _split_title_year(items: pl.DataFrame) -> pl.DataFrame:
    """Move the title's "(1995)" to `year`, preferring it over any other source of the year.

    GroupLens titles carry the year and RecBole's mostly do not (RecBole split it off itself,
    and got "(1995) (V)" wrong); taking it out here is what makes both layouts clean to the
    same text. The last year in the title wins.
    """
    title_year = pl.col("title").str.extract_all(TITLE_YEAR).list.last()
    title_year = title_year.str.extract(r"(\d{4})", 1).cast(pl.Int32)
    year = pl.coalesce(title_year, pl.col("year")) if "year" in items.columns else title_year
    return items.with_columns(
        year=year,
        title=pl.col("title").str.replace_all(TITLE_YEAR, "").str.strip_chars(),
    )


# --- MovieLens latest-small -----------------------------------------------------------------


def read_ml_latest_small(tree: SourceTree, max_bad_lines: int = 0) -> RawDataset:
    files = require(tree, "ml-latest-small", ["ratings.csv", "movies.csv"])
    csv_opts = {"separator": ",", "quoted": True, "max_bad_lines": max_bad_lines}
    inter, r1 = read_delimited(
        files["ratings.csv"],
        interaction_columns(pl.Int64),
        header=("userId", "movieId", "rating", "timestamp"),
        **csv_opts,
    )
    inter = _nonempty(inter, r1, "ratings")
    items, r2 = read_delimited(
        files["movies.csv"],
        [
            Column("item_id", pl.Int64),
            Column("title", pl.String, required=False),
            Column("genres", pl.String, required=False),
        ],
        header=("movieId", "title", "genres"),
        **csv_opts,
    )
    items = _nonempty(items, r2, "items")
    items = _split_title_year(
        items.with_columns(
            genres=pl.col("genres")
            .str.split("|")
            .list.filter((pl.element() != "") & (pl.element() != "(no genres listed)")),
        )
    )
    frames, reports = {"interactions": inter, "items": items}, [r1, r2]
    tags_file = tree.find("tags.csv")
    if tags_file is not None:
        frames["tags"], r3 = read_delimited(
            tags_file,
            [
                Column("user_id", pl.Int64),
                Column("item_id", pl.Int64),
                Column("tag", pl.String),
                Column("timestamp", pl.Int64),
            ],
            header=("userId", "movieId", "tag", "timestamp"),
            **csv_opts,
        )
        reports.append(r3)
    return _finish("ml-latest-small", "grouplens-csv", tree, pl.Int64, frames, reports)


# --- Amazon 2014 Beauty ---------------------------------------------------------------------


def read_beauty(tree: SourceTree, max_bad_lines: int = 0) -> RawDataset:
    files = require(tree, "beauty", ["ratings_Beauty.csv", "meta_Beauty.json.gz"])
    inter, r1 = read_delimited(
        files["ratings_Beauty.csv"],
        interaction_columns(pl.String),
        separator=",",
        quoted=True,
        max_bad_lines=max_bad_lines,
    )
    inter = _nonempty(inter, r1, "ratings")
    items, r2 = read_amazon_meta(files["meta_Beauty.json.gz"], max_bad_lines)
    items = _nonempty(items, r2, "items")
    return _finish(
        "beauty",
        "amazon-2014",
        tree,
        pl.String,
        {
            "interactions": inter,
            "items": items,
        },
        [r1, r2],
    )


def read_amazon_meta(raw: RawFile, max_bad_lines: int = 0) -> tuple[pl.DataFrame, ParseReport]:
    """Amazon 2014 product metadata: one Python dict literal per line, parsed safely."""
    report = ParseReport(raw.label)
    rows = []
    for number, record in iter_literal_lines(raw, report):
        row, problem = _amazon_row(record)
        if problem:
            report.issues.append(ParseIssue(number, problem))
        else:
            rows.append(row | {LINE: number})
    if len(report.issues) > max_bad_lines:
        raise MalformedInputError(report, max_bad_lines)
    schema = {"item_id": pl.String, **ITEM_COLUMNS, LINE: pl.Int64}
    frame = pl.DataFrame(rows, schema=schema, orient="row" if not rows else None)
    report.rows_kept = frame.height
    return frame, report


def _amazon_row(record: dict) -> tuple[dict, str | None]:
    asin = record.get("asin")
    if not isinstance(asin, str) or not asin.strip():
        return {}, "no 'asin'"
    related = record.get("related") or {}
    rank = record.get("salesRank") or {}
    categories = record.get("categories") or []
    price = record.get("price")
    if (
        not isinstance(related, dict)
        or not isinstance(rank, dict)
        or not isinstance(categories, list)
    ):
        return {}, "'related', 'salesRank' or 'categories' has the wrong type"
    # A string where a list is meant would otherwise be read letter by letter.
    if not all(isinstance(path, list | tuple) for path in categories):
        return {}, "'categories' is not a list of category paths (lists)"
    links = {key: related.get(key, []) for key in ("also_bought", "also_viewed", "bought_together")}
    wrong = [key for key, value in links.items() if not isinstance(value, list | tuple)]
    if wrong:
        return {}, f"'related' {', '.join(wrong)} is not a list of ASINs"
    try:
        rank_category, rank_value = next(iter(rank.items())) if rank else (None, None)
        sales_rank = int(rank_value) if rank_value is not None else None
        price_value = float(price) if price is not None else None
    except (TypeError, ValueError, OverflowError) as exc:
        return {}, f"bad field value ({exc})"
    if sales_rank is not None and not -(2**63) <= sales_rank < 2**63:
        return {}, f"salesRank {sales_rank} does not fit a 64-bit integer"
    if price_value is not None and not math.isfinite(price_value):
        return {}, f"price {price!r} is not a finite number"
    row = {
        "item_id": asin.strip(),
        "title": _text(record.get("title")),
        "year": None,
        "genres": None,
        "brand": _text(record.get("brand")),
        "categories": [[_text(str(c)) or "" for c in path] for path in categories],
        **{key: [str(a) for a in value] for key, value in links.items()},
        "sales_rank_category": _text(rank_category),
        "sales_rank": sales_rank,
        "price": price_value,
    }
    return row, None


def _text(value: object) -> str | None:
    """Amazon's text as a person reads it: HTML entities decoded ("&amp;" → "&"), whitespace
    runs collapsed. The 2014 dump stores titles and brands HTML-escaped; undecoded, "&amp;"
    would reach item names, KG entities and prompts."""
    return " ".join(html.unescape(value).split()) or None if isinstance(value, str) else None


READERS: dict[str, Callable[..., RawDataset]] = {
    "ml-100k": read_ml_100k,
    "ml-latest-small": read_ml_latest_small,
    "beauty": read_beauty,
}


def read_dataset(
    dataset: str,
    tree: SourceTree,
    max_bad_lines: int = 0,
    max_unknown_item_share: float = MAX_UNKNOWN_ITEM_SHARE,
    movie_list: SourceTree | None = None,
) -> RawDataset:
    """Every raw frame of `dataset` from `tree`, or an error naming the file and the reason.

    `movie_list` (ml-100k only) is where RecBole's Freebase links find MovieLens movieIds.

    Everything is checked here, before a caller writes anything: malformed lines beyond the
    tolerance, required files without data, and a catalogue that does not match its ratings.
    """
    if dataset not in READERS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {', '.join(READERS)}.")
    if not (0.0 <= max_unknown_item_share <= 1.0):
        raise ValueError(f"max_unknown_item_share={max_unknown_item_share} must be in [0, 1]")
    if movie_list is not None and dataset != "ml-100k":
        raise ValueError(f"movie_list is for ml-100k's Freebase links; {dataset} has none to map")
    extra = {"movie_list": movie_list} if movie_list is not None else {}
    raw = READERS[dataset](tree, max_bad_lines, **extra)
    raw.unknown_item_ratings = check_catalogue(raw, max_unknown_item_share)
    return raw


def check_catalogue(raw: RawDataset, max_unknown_item_share: float) -> int:
    """How many ratings name items the item file lacks; an error above the given share.

    Preparation can only drop such ratings, so without this count a ratings file paired with
    the wrong catalogue would lose most of its rows without a word.
    """
    inter, items = raw.frames["interactions"], raw.frames["items"]
    unknown_rows = inter.join(items.select("item_id"), on="item_id", how="anti")
    unknown, total = unknown_rows.height, inter.height
    if total and unknown / total > max_unknown_item_share:
        examples = unknown_rows["item_id"].unique().sort().head(5).to_list()
        raise CatalogueMismatchError(
            f"{raw.interactions_file}: {unknown:,} of {total:,} ratings ({unknown / total:.1%}) "
            f"name items that are not in {raw.items_file} (e.g. item_id {examples}), above "
            f"max_unknown_item_share={max_unknown_item_share}. A catalogue that does not match "
            "its ratings is usually the wrong file; check the source, or raise the share to "
            "ingest anyway (preparation drops those ratings)."
        )
    return unknown
