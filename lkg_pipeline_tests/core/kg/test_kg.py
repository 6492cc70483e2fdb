from pathlib import Path

import duckdb
import polars as pl
import pytest

from lkg_pipeline.core.data import validate
from lkg_pipeline.core.kg.graph import KGConfig, build_kg
from lkg_pipeline.core.kg.relations import RELATIONS
from lkg_pipeline.core.kg.warehouse import read_parquet, write_duckdb, write_kg, write_parquet

INVERSES = {r.name: r.inverse for r in RELATIONS.values()}


def items_frame(rows: list[tuple]) -> pl.DataFrame:
    """rows: (item_idx, item_id, title, year, genres, n_train_interactions)."""
    return pl.DataFrame(
        rows,
        orient="row",
        schema={
            "item_idx": pl.Int32,
            "item_id": pl.Int64,
            "title": pl.String,
            "year": pl.Int32,
            "genres": pl.List(pl.String),
            "n_train_interactions": pl.Int32,
        },
    ).with_columns(
        brand=pl.lit(None, pl.String),
        categories=pl.lit(None, pl.List(pl.List(pl.String))),
        also_bought=pl.lit(None, pl.List(pl.String)),
        also_viewed=pl.lit(None, pl.List(pl.String)),
        bought_together=pl.lit(None, pl.List(pl.String)),
        sales_rank_category=pl.lit(None, pl.String),
    )


def sequences_frame(per_user: dict[int, list[int]]) -> pl.DataFrame:
    """Each user's items in order; the last two are val and test."""
    rows = []
    for user, seq in per_user.items():
        for pos, item in enumerate(seq):
            split = "test" if pos == len(seq) - 1 else "val" if pos == len(seq) - 2 else "train"
            rows.append(
                (user, item, 100 + user, 10 + item, 4.0, 1000 + 10 * user + pos, pos, split)
            )
    return pl.DataFrame(
        rows,
        orient="row",
        schema={
            "user_idx": pl.Int32,
            "item_idx": pl.Int32,
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "rating": pl.Float32,
            "timestamp": pl.Int64,
            "position": pl.Int32,
            "split": pl.String,
        },
    )


def tiny_graph_inputs() -> tuple[pl.DataFrame, pl.DataFrame]:
    items = items_frame(
        [
            (0, 10, "A (2000)", 2000, ["Drama"], 1),
            (1, 11, "B (2001)", 2001, ["Drama", "Comedy"], 2),
            (2, 12, "C (2000)", 2000, ["Comedy"], 1),
            (3, 13, "D", None, [], 0),
        ]
    )
    return items, sequences_frame({0: [0, 1, 2, 3], 1: [1, 2, 0, 3]})


def triple_set(kg) -> set[tuple[int, str, int, float]]:
    return {
        (h, r, t, w)
        for h, r, t, w in kg.triples.select("head", "relation", "tail", "weight").iter_rows()
    }


def test_tiny_graph_exact_triples() -> None:
    items, seqs = tiny_graph_inputs()
    kg = build_kg(items, seqs)
    # ids: items 0-3, users 4-5, then genre:Comedy 6, genre:Drama 7, year:2000 8, year:2001 9
    assert kg.entities.select("entity_id", "type", "name").rows() == [
        (0, "item", "A (2000)"),
        (1, "item", "B (2001)"),
        (2, "item", "C (2000)"),
        (3, "item", "D"),
        (4, "user", "user 100"),
        (5, "user", "user 101"),
        (6, "genre", "Comedy"),
        (7, "genre", "Drama"),
        (8, "year", "2000"),
        (9, "year", "2001"),
    ]
    forward = {
        (4, "rated", 0, 1.0),
        (4, "rated", 1, 1.0),
        (5, "rated", 1, 1.0),
        (5, "rated", 2, 1.0),
        (0, "co_rated", 1, 1.0),
        (1, "co_rated", 2, 1.0),
        (0, "has_genre", 7, 1.0),
        (1, "has_genre", 6, 1.0),
        (1, "has_genre", 7, 1.0),
        (2, "has_genre", 6, 1.0),
        (0, "released_in", 8, 1.0),
        (1, "released_in", 9, 1.0),
        (2, "released_in", 8, 1.0),
    }
    expected = forward | {(t, INVERSES[r], h, w) for h, r, t, w in forward}
    assert triple_set(kg) == expected
    rated = kg.triples.filter(pl.col("relation") == "rated").sort("head", "tail")
    assert rated["timestamp"].to_list() == [1000, 1001, 1010, 1011]
    assert validate.inverses_complete(kg.triples, INVERSES).passed
    assert validate.no_dangling_ids(kg.entities, kg.triples).passed
    coverage = validate.item_metadata_coverage(
        kg.entities, kg.triples, {"rated", "rated_by", "co_rated"}
    )
    assert not coverage.passed and coverage.metadata["items_covered"] == 3


def test_planted_test_interaction_never_enters_the_graph() -> None:
    items, seqs = tiny_graph_inputs()
    # User 2's test item is 0, with items 1 and 2 before it: were test interactions used,
    # co_rated(0, 1) and (0, 2) would get weight from user 2.
    planted = pl.concat([seqs, sequences_frame({2: [1, 2, 3, 0]})])
    kg = build_kg(items, planted)
    assert (6, "rated", 0) not in {t[:3] for t in triple_set(kg)}
    assert {t for t in triple_set(kg) if t[1] == "co_rated"} == {
        (0, "co_rated", 1, 1.0),
        (1, "co_rated", 0, 1.0),
        (1, "co_rated", 2, 2.0),
        (2, "co_rated", 1, 2.0),
    }
    assert validate.no_held_out_leakage(kg.triples, planted, n_items=4).passed

    # The check itself catches a leak: add the held-out edge and inflate a co-rating.
    leaked = pl.concat(
        [
            kg.triples,
            pl.DataFrame(
                {
                    "head": [6, 0],
                    "relation": ["rated", "co_rated"],
                    "tail": [0, 1],
                    "weight": [1.0, 5.0],
                    "rating": [4.0, None],
                    "timestamp": [1, None],
                },
                schema=kg.triples.schema,
            ),
        ]
    )
    outcome = validate.no_held_out_leakage(leaked, planted, n_items=4)
    assert not outcome.passed
    assert outcome.metadata["held_out_rated_edges"] == 1
    assert outcome.metadata["inflated_co_rated"] == 1


def test_co_rated_keeps_the_strongest_n_per_item() -> None:
    items = items_frame([(i, 10 + i, f"I{i}", 2000, [], 1) for i in range(4)])
    # Item 0 is co-rated with 1 by three users, with 2 by two users, with 3 by one user.
    seqs = sequences_frame({0: [0, 1, 2, 3, 98, 99], 1: [0, 1, 2, 97, 96], 2: [0, 1, 95, 94]})
    seqs = seqs.filter(pl.col("split") == "train")
    kg = build_kg(items, seqs, KGConfig(co_rated_top_n=1))
    co = {t for t in triple_set(kg) if t[1] == "co_rated"}
    # top-1 of 0 is 1 (w3); of 1 is 0 (w3); of 2 is 0 (w2, tie with 1 broken by lower index);
    # of 3 is 0 (w1, ties with 1 and 2).
    assert co == {
        (0, "co_rated", 1, 3.0),
        (1, "co_rated", 0, 3.0),
        (0, "co_rated", 2, 2.0),
        (2, "co_rated", 0, 2.0),
        (0, "co_rated", 3, 1.0),
        (3, "co_rated", 0, 1.0),
    }
    assert not any(t[1] == "co_rated" for t in triple_set(build_kg(items, seqs, KGConfig(0))))


def test_freebase_facts_are_oriented_named_and_deduplicated() -> None:
    items = items_frame(
        [
            (0, 1, "Heat (1995)", 1995, [], 5),
            (1, 2, "Ronin (1998)", 1998, [], 9),
            (2, 3, "Heat 2 (2000)", 2000, [], 1),
        ]
    )
    seqs = sequences_frame({0: [0, 1, 2]})
    links = pl.DataFrame({"item_id": [1, 2, 3], "entity_id": ["m.heat", "m.ronin", "m.heat2"]})
    triples = pl.DataFrame(
        {
            "head": ["m.heat", "m.mann", "m.ronin", "m.heat", "m.heat2", "m.heat", "m.x"],
            "relation": [
                "film.film.directed_by",
                "film.director.film",
                "film.film.directed_by",
                "film.film.sequel",
                "film.film.prequel",
                "film.film.unknown_rel",
                "film.film.actor",
            ],
            "tail": ["m.mann", "m.heat", "m.frank", "m.heat2", "m.heat", "m.y", "m.z"],
        }
    )
    kg = build_kg(items, seqs, entity_links=links, entity_triples=triples)
    names = dict(kg.entities.select("key", "name").iter_rows())
    assert names["person:m.mann"] == "director of Heat (1995)"
    assert names["person:m.frank"] == "director of Ronin (1998)"
    ids = dict(kg.entities.select("key", "entity_id").iter_rows())
    directed = {t[:3] for t in triple_set(kg) if t[1] == "directed_by"}
    assert directed == {
        (0, "directed_by", ids["person:m.mann"]),
        (1, "directed_by", ids["person:m.frank"]),
    }
    assert {t[:3] for t in triple_set(kg) if t[1] == "has_sequel"} == {(0, "has_sequel", 2)}
    assert kg.unmapped_relations == {"film.film.unknown_rel": 1}
    assert "m.x" not in " ".join(names)  # facts about films outside the catalogue are dropped


def test_a_freebase_name_pairs_the_role_with_a_film_of_that_role() -> None:
    """Mann directed Ronin (the most rated) and acted in both Heats: he is named by his most
    frequent role and a film he has it in, never "actor of Ronin"."""
    items = items_frame(
        [
            (0, 1, "Heat (1995)", 1995, [], 5),
            (1, 2, "Ronin (1998)", 1998, [], 9),
            (2, 3, "Heat 2 (2000)", 2000, [], 1),
        ]
    )
    links = pl.DataFrame({"item_id": [1, 2, 3], "entity_id": ["m.heat", "m.ronin", "m.heat2"]})
    triples = pl.DataFrame(
        {
            "head": ["m.ronin", "m.heat", "m.heat2"],
            "relation": ["film.film.directed_by", "film.film.actor", "film.film.actor"],
            "tail": ["m.mann"] * 3,
        }
    )
    kg = build_kg(
        items, sequences_frame({0: [0, 1, 2]}), entity_links=links, entity_triples=triples
    )
    names = dict(kg.entities.select("key", "name").iter_rows())
    assert names["person:m.mann"] == "actor of Heat (1995) and 2 more"


def test_tags_exclude_a_users_own_held_out_items() -> None:
    items, seqs = tiny_graph_inputs()
    tags = pl.DataFrame(
        {
            "user_id": [100, 100, 101, 101],
            "item_id": [10, 13, 10, 13],
            "tag": ["Gritty", "spoiler", "gritty ", "spoiler"],
            "timestamp": [1, 2, 3, 4],
        }
    )
    kg = build_kg(items, seqs, tags=tags)
    ids = dict(kg.entities.select("key", "entity_id").iter_rows())
    tagged = {t for t in triple_set(kg) if t[1] == "tagged"}
    # Item 13 (idx 3) is both users' test item and item 10 (idx 0) is user 101's val item:
    # their tags by those users would reveal them, so only user 100's tag on item 10 counts.
    assert tagged == {(0, "tagged", ids["tag:gritty"], 1.0)}
    assert "tag:spoiler" not in ids


def test_amazon_attributes_and_related_items() -> None:
    items = pl.DataFrame(
        {
            "item_idx": [0, 1],
            "item_id": ["A1", "A2"],
            "title": ["Serum", "Balm"],
            "year": [None, None],
            "genres": [None, None],
            "brand": ["Bio", None],
            "categories": [[["Beauty", "Skin Care", "Face"]], [["Beauty", "Lips"]]],
            "also_bought": [["A2", "ZZZ"], []],
            "also_viewed": [[], ["A1"]],
            "bought_together": [[], []],
            "sales_rank_category": ["Beauty", None],
            "n_train_interactions": [1, 1],
        },
        schema_overrides={
            "year": pl.Int32,
            "genres": pl.List(pl.String),
            "item_idx": pl.Int32,
            **{c: pl.List(pl.String) for c in ("also_bought", "also_viewed", "bought_together")},
        },
    )
    kg = build_kg(items, sequences_frame({0: [0, 1, 0]}).head(0))
    keys = dict(kg.entities.select("entity_id", "key").iter_rows())
    edges = {(h, r, keys[t]) for h, r, t, _ in triple_set(kg) if h < 2}
    assert edges == {
        (0, "has_brand", "brand:Bio"),
        (0, "in_category", "category:Beauty"),
        (0, "in_category", "category:Skin Care"),
        (0, "in_category", "category:Face"),
        (0, "has_category_path", "category_path:Beauty > Skin Care > Face"),
        (0, "ranked_in", "sales_rank_category:Beauty"),
        (0, "also_bought", "item:1"),
        (0, "also_viewed_from", "item:1"),
        (1, "in_category", "category:Beauty"),
        (1, "in_category", "category:Lips"),
        (1, "has_category_path", "category_path:Beauty > Lips"),
        (1, "also_bought_from", "item:0"),
        (1, "also_viewed", "item:0"),
    }


def test_user_attributes_are_off_by_default() -> None:
    items, seqs = tiny_graph_inputs()
    users = pl.DataFrame(
        {
            "user_id": [100, 101],
            "age": [17, 30],
            "gender": ["F", "M"],
            "occupation": ["student", "writer"],
            "zip_code": ["1", "2"],
        }
    )
    assert not build_kg(items, seqs, users=users).entities["type"].is_in(["age_group"]).any()
    kg = build_kg(items, seqs, KGConfig(user_attributes=True), users=users)
    keys = dict(kg.entities.select("entity_id", "key").iter_rows())
    assert {(h, r, keys[t]) for h, r, t, _ in triple_set(kg) if r == "has_age_group"} == {
        (4, "has_age_group", "age_group:under 18"),
        (5, "has_age_group", "age_group:25-34"),
    }


def test_warehouse_round_trip(tmp_path: Path) -> None:
    items, seqs = tiny_graph_inputs()
    kg = build_kg(items, seqs)
    db = tmp_path / "warehouse" / "tiny.duckdb"
    write_duckdb(kg, db)
    write_duckdb(kg, db)  # idempotent: replaces, never appends
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.sql("select count(*) from triples").fetchall()[0][0] == kg.triples.height
        assert con.sql("select count(*) from entities").fetchall()[0][0] == kg.entities.height
    assert sorted(p.name for p in db.parent.iterdir()) == ["tiny.duckdb"]
    write_parquet(kg, tmp_path / "pq")
    back = read_parquet(tmp_path / "pq")
    assert back.triples.equals(kg.triples) and back.entities.equals(kg.entities)


def test_failed_write_keeps_the_previous_database(tmp_path: Path) -> None:
    items, seqs = tiny_graph_inputs()
    kg = build_kg(items, seqs)
    db = tmp_path / "g.duckdb"
    write_duckdb(kg, db)
    before = db.read_bytes()
    broken = type(kg)(kg.entities, kg.triples.with_columns(head=pl.lit("x")), kg.relations, {})
    broken.relations = None  # registering None fails half-way through the build
    try:
        write_duckdb(broken, db)
    except Exception:  # noqa: BLE001 - any failure will do; the point is what it leaves
        pass
    else:
        raise AssertionError("the broken write should have failed")
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.duckdb"]


def test_the_graphs_two_copies_are_replaced_together_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_kg stages the DuckDB file and the Parquet folder in full before replacing either:
    a failure while writing the Parquet copy (after the DuckDB build) leaves both old copies."""
    items, seqs = tiny_graph_inputs()
    kg = build_kg(items, seqs)
    db, folder = tmp_path / "wh" / "g.duckdb", tmp_path / "kg" / "g"
    paths = write_kg(kg, db, folder)
    assert sorted(p.name for p in paths.values()) == sorted(p.name for p in folder.iterdir())
    db_before = db.read_bytes()
    files_before = {p.name: p.read_bytes() for p in folder.iterdir()}
    # a different graph (one triple fewer) whose Parquet write fails (a full disk, say) after
    # its DuckDB build and after the first of its three tables
    smaller = type(kg)(kg.entities, kg.triples.head(kg.triples.height - 1), kg.relations, {})
    real_write = pl.DataFrame.write_parquet
    written: list[str] = []

    def fail_on_second(frame: pl.DataFrame, path, **kwargs) -> None:
        written.append(str(path))
        if len(written) == 2:
            raise OSError("No space left on device")
        real_write(frame, path, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", fail_on_second)
    with pytest.raises(OSError, match="No space left"):
        write_kg(smaller, db, folder)
    monkeypatch.undo()
    assert len(written) == 2
    assert db.read_bytes() == db_before
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files_before
    assert sorted(p.name for p in db.parent.iterdir()) == ["g.duckdb"]  # no temporary left
    assert sorted(p.name for p in folder.parent.iterdir()) == ["g"]
    write_kg(type(kg)(kg.entities, kg.triples.head(5), kg.relations, {}), db, folder)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.sql("select count(*) from triples").fetchall()[0][0] == 5
    assert read_parquet(folder).triples.height == 5
