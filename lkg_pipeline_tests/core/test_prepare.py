from pathlib import Path

import polars as pl
import pytest

from lkg_pipeline.core import validate
from lkg_pipeline.core.ingest import ML100K_GENRES, read_dataset
from lkg_pipeline.core.prepare import PrepareConfig, clean_title, k_core, prepare
from lkg_pipeline.core.sources import FolderTree, ZipTree


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
    out = prepare(inter, items, PrepareConfig(min_user_interactions=3, min_item_interactions=1))
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
    a = prepare(inter, items, config)
    b = prepare(inter.sample(fraction=1.0, shuffle=True, seed=3), items.reverse(), config)
    assert a.sequences.sort("user_idx", "position").equals(b.sequences.sort("user_idx", "position"))
    assert a.items.equals(b.items)


def test_duplicate_pairs_keep_the_earliest_rating() -> None:
    inter = interactions([(1, 1, 5), (1, 1, 1), (1, 2, 2), (1, 3, 3)])
    out = prepare(inter, items_for([1, 2, 3]), PrepareConfig(3, 1))
    assert out.sequences.sort("position")["item_id"].to_list() == [1, 2, 3]
    assert out.stats["duplicate_pairs_dropped"] == 1


def test_validators_catch_broken_splits_and_ids() -> None:
    inter, items = tiny()
    out = prepare(inter, items, PrepareConfig(3, 1))
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
    kept_placeholder = prepare(inter, items, PrepareConfig(drop_placeholder_titles=False))
    assert (
        kept_placeholder.stats["interactions"],
        kept_placeholder.stats["users"],
        kept_placeholder.stats["items"],
    ) == (99_287, 943, 1_349)
    default = prepare(inter, items, PrepareConfig())
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
    a = prepare(recbole.frames["interactions"], recbole.frames["items"], PrepareConfig())
    b = prepare(grouplens.frames["interactions"], grouplens.frames["items"], PrepareConfig())
    assert a.sequences.equals(b.sequences)
    assert a.items.select("item_idx", "item_id", "title", "year", "genres").equals(
        b.items.select("item_idx", "item_id", "title", "year", "genres")
    )
