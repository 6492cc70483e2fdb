import gzip
from pathlib import Path

import polars as pl
import pytest

from lkg_pipeline.core.data import validate
from lkg_pipeline.core.data.ingest import ML100K_GENRES, read_dataset
from lkg_pipeline.core.data.prepare import (
    TITLE_CLEANERS,
    TITLE_STYLES,
    EmptyPreparationError,
    PrepareConfig,
    clean_product_title,
    clean_title,
    k_core,
    prepare,
)
from lkg_pipeline.core.data.sources import DATASETS, FolderTree, ZipTree


@pytest.mark.parametrize(
    ("raw", "year", "clean"),
    [
        ("Usual Suspects, The (1995)", 1995, "The Usual Suspects (1995)"),
        ("Usual Suspects, The", 1995, "The Usual Suspects (1995)"),
        ("Seven (Se7en)", 1995, "Seven (1995)"),
        ("Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)", 1995, "Shanghai Triad (1995)"),
        ("Misérables, Les", 1995, "Les Misérables (1995)"),
        (
            "Double vie de Véronique, La (Double Life of Veronique, The)",
            1991,
            "La Double vie de Véronique (1991)",
        ),
        ("Eclisse, L'", 1962, "L'Eclisse (1962)"),
        (
            "To Wong Foo, Thanks for Everything! Julie Newmar",
            1995,
            "To Wong Foo, Thanks for Everything! Julie Newmar (1995)",
        ),
        ("Babylon 5", None, "Babylon 5"),
        (
            "Land Before Time III: The Time of the Great Giving (V)",
            1995,
            "Land Before Time III: The Time of the Great Giving (1995)",
        ),
        ("  ", 1990, None),
        (None, 1990, None),
        ("unkonwn", None, None),
        ("(500) Days of Summer", 2009, "(500) Days of Summer (2009)"),  # not an alternate
        (
            "City of Lost Children, The (Cité des enfants perdus, La)",
            1995,
            "The City of Lost Children (1995)",
        ),
    ],
)
def test_clean_title(raw: str | None, year: int | None, clean: str | None) -> None:
    assert clean_title(raw, year) == clean


def interactions(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "rating": [4.0] * len(rows),
            "timestamp": [r[2] for r in rows],
        },
        schema={
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "rating": pl.Float32,
            "timestamp": pl.Int64,
        },
    )


def items_for(ids: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {"item_id": ids, "title": [f"Movie {i}" for i in ids], "year": [2000] * len(ids)},
        schema={"item_id": pl.Int64, "title": pl.String, "year": pl.Int32},
    )


def test_k_core_is_iterative() -> None:
    # Item 9 has 2 raters, so it goes; that leaves users 4 and 5 with 2 items each, so they go
    # in a second round. A single pass would have kept them.
    rows = [(u, i, 0) for u in (1, 2, 3) for i in (1, 2, 3)]
    rows += [(4, 1, 0), (4, 2, 0), (4, 9, 0), (5, 9, 0), (5, 1, 0), (5, 2, 0)]
    kept, rounds = k_core(interactions(rows), min_user=3, min_item=3)
    assert set(kept["user_id"]) == {1, 2, 3} and set(kept["item_id"]) == {1, 2, 3}
    assert rounds == 3


def tiny() -> tuple[pl.DataFrame, pl.DataFrame]:
    rows = [
        # user 7: items 30 and 10 at the same second at the end → 10 is val, 30 is test
        (7, 20, 1),
        (7, 40, 2),
        (7, 30, 5),
        (7, 10, 5),
        (5, 10, 1),
        (5, 20, 1),
        (5, 30, 2),
        (5, 40, 3),
        (9, 40, 1),
        (9, 30, 2),
        (9, 20, 3),
        (9, 10, 4),
    ]
    return interactions(rows), items_for([10, 20, 30, 40, 50])


def test_dense_ids_tie_break_and_split() -> None:
    inter, items = tiny()
    out = prepare(
        inter,
        items,
        PrepareConfig(min_user_interactions=3, min_item_interactions=1),
        title_style="movielens",
    )
    assert out.items["item_id"].to_list() == [10, 20, 30, 40]  # 50 has no interaction
    assert out.items["item_idx"].to_list() == [0, 1, 2, 3]
    seqs = out.sequences
    assert seqs.filter(pl.col("user_id") == 5)["user_idx"].unique().to_list() == [0]
    user7 = seqs.filter(pl.col("user_id") == 7).sort("position")
    assert user7["item_id"].to_list() == [20, 40, 10, 30]
    assert user7["split"].to_list() == ["train", "train", "val", "test"]
    user5 = seqs.filter(pl.col("user_id") == 5).sort("position")
    assert user5["item_id"].to_list() == [10, 20, 30, 40]  # 10 and 20 tie at t=1
    assert out.stats["users_with_tied_last_two"] == 1


def test_input_order_does_not_change_the_result() -> None:
    inter, items = tiny()
    config = PrepareConfig(min_user_interactions=3, min_item_interactions=1)
    a = prepare(inter, items, config, title_style="movielens")
    b = prepare(
        inter.sample(fraction=1.0, shuffle=True, seed=3),
        items.reverse(),
        config,
        title_style="movielens",
    )
    assert a.sequences.sort("user_idx", "position").equals(b.sequences.sort("user_idx", "position"))
    assert a.items.equals(b.items)


def test_duplicate_pairs_keep_the_earliest_rating() -> None:
    inter = interactions([(1, 1, 5), (1, 1, 1), (1, 2, 2), (1, 3, 3)])
    out = prepare(inter, items_for([1, 2, 3]), PrepareConfig(3, 1), title_style="movielens")
    assert out.sequences.sort("position")["item_id"].to_list() == [1, 2, 3]
    assert out.stats["duplicate_pairs_dropped"] == 1


def test_duplicates_in_the_same_second_keep_the_higher_rating_in_any_file_order() -> None:
    rows = [(1, 1, 1), (1, 2, 2), (1, 3, 3)]
    inter = interactions(rows).with_columns(pl.col("rating").cast(pl.Float32))
    twice = pl.concat(
        [inter, inter.filter(pl.col("item_id") == 2).with_columns(rating=pl.lit(5.0, pl.Float32))]
    )
    kept = [
        prepare(frame, items_for([1, 2, 3]), PrepareConfig(3, 1), title_style="movielens")
        .sequences.filter(pl.col("item_id") == 2)["rating"]
        .to_list()
        for frame in (twice, twice.reverse())
    ]
    assert kept == [[5.0], [5.0]]


def test_placeholder_titles_kept_read_unknown() -> None:
    """RecBole spells the placeholder 'unkonwn', GroupLens 'unknown': kept, both read 'unknown'."""
    assert clean_title("unkonwn", None, False) == clean_title("unknown", None, False) == "unknown"


def test_validators_catch_broken_splits_and_ids() -> None:
    inter, items = tiny()
    out = prepare(inter, items, PrepareConfig(3, 1), title_style="movielens")
    assert validate.leave_one_out_consistent(out.sequences).passed
    no_val = out.sequences.filter(~((pl.col("user_idx") == 0) & (pl.col("split") == "val")))
    assert not validate.leave_one_out_consistent(no_val).passed
    swapped = out.sequences.with_columns(
        split=pl.when(pl.col("split") == "val")
        .then(pl.lit("test"))
        .when(pl.col("split") == "test")
        .then(pl.lit("val"))
        .otherwise(pl.col("split"))
    )
    assert not validate.leave_one_out_consistent(swapped).passed
    assert not validate.dense_ids(out.items.filter(pl.col("item_idx") != 1), "item_idx").passed
    assert not validate.unique_ids(pl.concat([out.items, out.items.head(1)]), "item_idx").passed
    assert not validate.min_sequence_length(out.sequences.filter(pl.col("position") < 2)).passed
    blank = out.items.with_columns(title=pl.lit(" "))
    assert validate.non_empty_titles(blank).metadata["items_without_title"] == 4


def test_real_ml100k_figures(recbole_wheel: Path) -> None:
    raw = read_dataset("ml-100k", ZipTree(recbole_wheel))
    inter, items = raw.frames["interactions"], raw.frames["items"]
    kept_placeholder = prepare(
        inter, items, PrepareConfig(drop_placeholder_titles=False), title_style="movielens"
    )
    assert (
        kept_placeholder.stats["interactions"],
        kept_placeholder.stats["users"],
        kept_placeholder.stats["items"],
    ) == (99_287, 943, 1_349)
    default = prepare(inter, items, PrepareConfig(), title_style="movielens")
    assert (default.stats["interactions"], default.stats["users"], default.stats["items"]) == (
        99_278,
        943,
        1_348,
    )
    assert default.stats["users_with_tied_last_two"] == 416
    for outcome in (
        validate.leave_one_out_consistent(default.sequences),
        validate.dense_ids(default.sequences, "user_idx"),
        validate.dense_ids(default.items, "item_idx"),
        validate.non_empty_titles(default.items),
    ):
        assert outcome.passed, outcome.description


def to_grouplens(raw_frames: dict[str, pl.DataFrame], folder: Path) -> None:
    """Write RecBole's ML-100K as GroupLens' u.data / u.item (Latin-1, flags) / u.user."""
    folder.mkdir()
    inter = raw_frames["interactions"]
    (folder / "u.data").write_text(
        "".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in inter.iter_rows())
    )
    lines = []
    for row in raw_frames["items"].iter_rows(named=True):
        year = row["year"]
        title = "unknown" if row["title"] == "unkonwn" else row["title"]
        title = f"{title} ({year})" if year is not None else title
        date = f"01-Jan-{year}" if year is not None else ""
        flags = "|".join("1" if g in row["genres"] else "0" for g in ML100K_GENRES)
        lines.append(f"{row['item_id']}|{title}|{date}||http://imdb|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    (folder / "u.user").write_text(
        "".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in raw_frames["users"].iter_rows())
    )


def test_grouplens_and_recbole_layouts_prepare_identically(recbole_wheel: Path, tmp_path: Path):
    recbole = read_dataset("ml-100k", ZipTree(recbole_wheel))
    to_grouplens(recbole.frames, tmp_path / "gl")
    grouplens = read_dataset("ml-100k", FolderTree(tmp_path / "gl"))
    assert grouplens.layout == "grouplens"
    a = prepare(
        recbole.frames["interactions"],
        recbole.frames["items"],
        PrepareConfig(),
        title_style="movielens",
    )
    b = prepare(
        grouplens.frames["interactions"],
        grouplens.frames["items"],
        PrepareConfig(),
        title_style="movielens",
    )
    assert a.sequences.equals(b.sequences)
    assert a.items.select("item_idx", "item_id", "title", "year", "genres").equals(
        b.items.select("item_idx", "item_id", "title", "year", "genres")
    )


# --- issue 16: titles per source, empty results, unknown items -------------------------------


def test_every_dataset_has_a_title_style() -> None:
    assert set(TITLE_STYLES) == set(DATASETS)
    assert set(TITLE_STYLES.values()) <= set(TITLE_CLEANERS)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Face Wash (Oil-Free)", "Face Wash (Oil-Free)"),
        ("Moisturiser, The", "Moisturiser, The"),
        ("Night Cream (2014)", "Night Cream (2014)"),
        ("  Shampoo &  Conditioner\n", "Shampoo & Conditioner"),
        ("unknown", "unknown"),
        (" ", None),
        (None, None),
    ],
)
def test_amazon_titles_keep_their_text(raw: str | None, clean: str | None) -> None:
    assert clean_product_title(raw) == clean


def test_beauty_titles_reach_items_unescaped_and_unchanged(tmp_path: Path) -> None:
    titles = ["Shampoo &amp; Conditioner", "Face Wash (Oil-Free)", "Soap, The", "Cream (2014)"]
    meta = "".join(f"{{'asin': 'B{i}', 'title': {t!r}}}\n" for i, t in enumerate(titles))
    (tmp_path / "meta_Beauty.json.gz").write_bytes(gzip.compress(meta.encode()))
    (tmp_path / "ratings_Beauty.csv").write_text(
        "".join(f"U{u},B{i},5.0,{u * 10 + i}\n" for u in range(3) for i in range(4))
    )
    raw = read_dataset("beauty", FolderTree(tmp_path))
    out = prepare(
        raw.frames["interactions"],
        raw.frames["items"],
        PrepareConfig(3, 1),
        title_style=TITLE_STYLES["beauty"],
    )
    assert out.items["title"].to_list() == [
        "Shampoo & Conditioner",
        "Face Wash (Oil-Free)",
        "Soap, The",
        "Cream (2014)",
    ]
    with pytest.raises(ValueError, match="Unknown title_style 'imdb'; choose one of movielens"):
        prepare(
            raw.frames["interactions"], raw.frames["items"], PrepareConfig(), title_style="imdb"
        )


def test_nothing_left_after_the_k_core_says_why() -> None:
    inter, items = tiny()
    with pytest.raises(
        EmptyPreparationError,
        match=r"Nothing is left after the k-core \(min_user_interactions=5, "
        r"min_item_interactions=5\): before it, 12 interactions by 3 users on 4 items \(at most "
        r"4 per user, 3 per item\)",
    ):
        prepare(inter, items, PrepareConfig(), title_style="movielens")


def test_no_rating_on_a_titled_item_says_the_files_do_not_match() -> None:
    inter, _ = tiny()
    with pytest.raises(
        EmptyPreparationError,
        match=r"12 raw interactions, 0 of them on catalogue items; 2 raw items, 2 with a title",
    ):
        prepare(inter, items_for([98, 99]), PrepareConfig(3, 1), title_style="movielens")
    with pytest.raises(EmptyPreparationError, match="Nothing to prepare: 0 raw interactions"):
        prepare(inter.clear(), items_for([10]), PrepareConfig(3, 1), title_style="movielens")


def test_ratings_of_unknown_and_untitled_items_are_counted() -> None:
    inter, items = tiny()
    extra = interactions([(5, 77, 9), (7, 88, 9)])  # items 77, 88 are not in the catalogue
    untitled = items.with_columns(
        title=pl.when(pl.col("item_id") == 40).then(None).otherwise(pl.col("title"))
    )
    out = prepare(pl.concat([inter, extra]), untitled, PrepareConfig(3, 1), title_style="movielens")
    assert out.stats["interactions_unknown_item"] == 2
    assert out.stats["interactions_untitled_item"] == 3  # the three ratings of item 40
    assert 40 not in out.items["item_id"].to_list()


def test_checks_fail_on_empty_tables() -> None:
    inter, items = tiny()
    out = prepare(inter, items, PrepareConfig(3, 1), title_style="movielens")
    for outcome in (
        validate.unique_ids(out.items.clear(), "item_idx", "item_id"),
        validate.dense_ids(out.items.clear(), "item_idx"),
        validate.non_empty_titles(out.items.clear()),
        validate.dense_ids(out.sequences.clear(), "user_idx"),
        validate.min_sequence_length(out.sequences.clear()),
        validate.leave_one_out_consistent(out.sequences.clear()),
    ):
        assert not outcome.passed and "empty table" in outcome.description, outcome


def test_graph_and_candidate_checks_fail_on_empty_tables() -> None:
    inter, items = tiny()
    seqs = prepare(inter, items, PrepareConfig(3, 1), title_style="movielens").sequences
    entities = pl.DataFrame(schema={"entity_id": pl.Int64, "type": pl.String, "name": pl.String})
    triples = pl.DataFrame(
        schema={"head": pl.Int64, "relation": pl.String, "tail": pl.Int64, "weight": pl.Int64}
    )
    candidates = pl.DataFrame(
        schema={
            "user_idx": pl.Int32,
            "prefix_len": pl.Int32,
            "target_item_idx": pl.Int32,
            "candidate_item_idxs": pl.List(pl.Int32),
            "in_candidates": pl.Boolean,
        }
    )
    for outcome in (
        validate.no_dangling_ids(entities, triples),
        validate.inverses_complete(triples, {"rated": "rated_by"}),
        validate.no_held_out_leakage(triples, seqs, n_items=4),
        validate.item_metadata_coverage(entities, triples, {"rated"}),
        validate.candidates_well_formed(candidates, seqs),
    ):
        assert not outcome.passed and "empty table" in outcome.description, outcome
