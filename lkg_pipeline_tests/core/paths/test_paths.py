import dataclasses
import json
from pathlib import Path

import polars as pl
import pytest

from benchmarks.paths.bench import QUICK_ITEMS, SHAPES, synthetic_inputs
from lkg_pipeline.core.kg.graph import build_kg
from lkg_pipeline.core.paths.enumeration import (
    PATH_SETTINGS_FILE,
    PathConfig,
    enumerate_paths,
    write_paths,
)
from lkg_pipeline_tests.core.kg.test_kg import sequences_frame, tiny_graph_inputs


def examples_frame(rows: list[tuple[int, int, str, int, int, list[int]]]) -> pl.DataFrame:
    """rows: (example_id, user_idx, split, prefix_len, target, candidates)."""
    return pl.DataFrame(
        rows,
        orient="row",
        schema={
            "example_id": pl.Int64,
            "user_idx": pl.Int32,
            "split": pl.String,
            "prefix_len": pl.Int32,
            "target_item_idx": pl.Int32,
            "candidate_item_idxs": pl.List(pl.Int32),
        },
    )


def run(examples: pl.DataFrame, config: PathConfig | None = None, seqs=None):
    items, default_seqs = tiny_graph_inputs()
    config = config or PathConfig()
    seqs = default_seqs if seqs is None else seqs
    kg = build_kg(items, seqs)
    return enumerate_paths(
        examples, seqs, kg.entities, kg.triples, kg.relations, items.height, config
    )


# The tiny graph (see test_kg): items A=0 (Drama, 2000), B=1 (Drama+Comedy, 2001),
# C=2 (Comedy, 2000), D=3 (nothing); co_rated A–B and B–C; node ids Comedy=6, Drama=7,
# year 2000=8, year 2001=9. Example 0: user 0 has seen A, B; candidates C and D.
EXAMPLE = examples_frame([(0, 0, "train", 2, 2, [2, 3])])


def test_paths_of_a_hand_made_graph() -> None:
    out = run(EXAMPLE)
    rows = out.paths.select(
        "history_item_idx",
        "candidate_item_idx",
        "hops",
        "path_type",
        "relations",
        "via",
        "via_name",
    ).rows()
    assert rows == [
        # most recent history item (B) first, then fewest hops, then rarer intermediate node
        (1, 2, 1, "co_rated", ["co_rated"], None, None),
        (1, 2, 2, "has_genre", ["has_genre", "genre_of"], 6, "Comedy"),
        (0, 2, 2, "released_in", ["released_in", "release_year_of"], 8, "2000"),
    ]
    assert out.pair_features.rows() == [  # (example, candidate, type, n_paths, its user)
        (0, 2, "co_rated", 1, 0),
        (0, 2, "has_genre", 1, 0),
        (0, 2, "released_in", 1, 0),
    ]
    assert out.stats["share_targets_with_path"] == 1.0
    assert out.stats["share_non_targets_with_path"] == 0.0
    # The profile reads the step A → B inside the history, never the target C.
    assert out.history_profile.rows() == [(0, "co_rated", 1.0), (0, "has_genre", 1.0)]
    no_hubs = run(EXAMPLE, PathConfig(max_attribute_degree=1))  # every attribute links 2 items
    assert no_hubs.pair_features["path_type"].to_list() == ["co_rated"]
    capped = run(EXAMPLE, PathConfig(max_paths_per_pair=1))
    assert capped.paths.select("history_item_idx", "path_type").rows() == [
        (1, "co_rated"),
        (0, "released_in"),
    ]
    assert capped.pair_features.height == 3  # counts keep every path, only samples are capped
    three = run(EXAMPLE, PathConfig(max_hops=3))
    extra = three.paths.filter(pl.col("hops") == 3).sort("history_item_idx", "path_type")
    # A -co_rated-> B -has_genre-> Comedy <- C; A -has_genre-> Drama <- B -co_rated-> C;
    # B -co_rated-> A -released_in-> 2000 <- C: each names the item it goes through
    assert extra.select(
        "history_item_idx", "path_type", "relations", "via_name", "via_item", "via_item_name"
    ).rows() == [
        (0, "co_rated", ["co_rated", "has_genre", "genre_of"], "Comedy", 1, "B (2001)"),
        (0, "has_genre", ["has_genre", "genre_of", "co_rated"], "Drama", 1, "B (2001)"),
        (1, "co_rated", ["co_rated", "released_in", "release_year_of"], "2000", 0, "A (2000)"),
    ]
    assert three.paths.filter(pl.col("hops") < 3)["via_item"].is_null().all()
    assert (
        run(EXAMPLE, PathConfig(max_hops=3, three_hop_max_degree=1))
        .paths.filter(pl.col("hops") == 3)
        .is_empty()
    )
    short = run(EXAMPLE, PathConfig(history_len=1))  # only B, the most recent
    assert set(short.paths["history_item_idx"]) == {1}


def test_paths_never_use_a_held_out_interaction() -> None:
    # User 2 watched B, C, D then (test) A. A–B are co-rated in training (user 0); were the
    # test interaction in the graph, co_rated would also link C and D to A through user 2.
    items, seqs = tiny_graph_inputs()
    planted = pl.concat([seqs, sequences_frame({2: [1, 2, 3, 0]})])
    examples = examples_frame([(7, 2, "test", 3, 0, [0])])
    out = run(examples, seqs=planted)
    co = out.paths.filter(pl.col("path_type") == "co_rated")
    assert co["history_item_idx"].to_list() == [1]
    assert not out.paths.filter(pl.col("history_item_idx") == 3).height  # D has no metadata


@pytest.mark.parametrize("shape", ["ml-100k-like", "beauty-like"])
def test_write_paths_in_user_batches_equals_enumerate_paths(tmp_path: Path, shape: str) -> None:
    """Streaming a batch of users at a time changes neither a row nor a statistic."""
    spec = dataclasses.replace(SHAPES[shape], n_items=QUICK_ITEMS[shape])
    inputs, _ = synthetic_inputs(spec, 25)
    config = PathConfig(max_hops=3)  # every query, 3-hop ones included
    graph = (inputs.entities, inputs.triples, inputs.relations, inputs.n_items)
    whole = enumerate_paths(inputs.examples, inputs.sequences, *graph, config)
    assert whole.paths.height > 0 and whole.history_profile.height > 0
    # Three-hop paths through the same rare node and different intermediate items are
    # different paths (1,953 identical rows here when the intermediate item was dropped).
    assert whole.paths.filter(pl.col("hops") == 3).height > 0
    assert whole.paths.height == whole.paths.unique().height
    tables = {
        "paths": whole.paths,
        "pair_features": whole.pair_features,
        "history_profile": whole.history_profile,
    }
    for users_per_batch, folder in ((100, tmp_path / "one"), (7, tmp_path / "four")):
        stats = write_paths(
            inputs.examples, inputs.sequences, *graph, folder, config, users_per_batch
        )
        assert stats["user_batches"] == (1 if users_per_batch == 100 else 4)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [PATH_SETTINGS_FILE, *(f"{t}.parquet" for t in tables)]
        )
        assert PathConfig(**json.loads((folder / PATH_SETTINGS_FILE).read_text())) == config
        for name, expected in tables.items():
            written = pl.read_parquet(folder / f"{name}.parquet")
            assert written.schema == expected.schema, name
            if users_per_batch == 100:  # one batch: the very same file contents, in order
                assert written.equals(expected), name
            else:
                assert written.sort(pl.all()).equals(expected.sort(pl.all())), name
        # Pairs shared by two batches are solved in each: the pair counts add up to more.
        same = {
            k for k in whole.stats if k not in ("seconds", "distinct_item_pairs", "item_pair_paths")
        }
        assert {k: stats[k] for k in same} == pytest.approx({k: whole.stats[k] for k in same})
        if users_per_batch == 100:
            assert stats["distinct_item_pairs"] == whole.stats["distinct_item_pairs"]


def test_enumerate_paths_is_deterministic_under_ties() -> None:
    """Two paths through one node by different relations tie on (hops, degree, type, via);
    the cap keeps the same one, in the same order, every time."""
    spec = dataclasses.replace(SHAPES["ml-100k-like"], n_items=QUICK_ITEMS["ml-100k-like"])
    inputs, _ = synthetic_inputs(spec, 15)
    config = PathConfig(max_paths_per_pair=1)
    runs = [inputs.enumerate(config).paths for _ in range(3)]
    assert runs[0].equals(runs[1]) and runs[0].equals(runs[2])


def test_write_paths_of_no_examples_writes_empty_tables(tmp_path: Path) -> None:
    stats = write_paths(EXAMPLE.head(0), *graph_of_tiny(), tmp_path / "empty")
    assert stats["concrete_paths_kept"] == 0 and stats["user_batches"] == 1
    expected = run(EXAMPLE)
    for name in ("paths", "pair_features", "history_profile"):
        written = pl.read_parquet(tmp_path / "empty" / f"{name}.parquet")
        assert written.height == 0
        assert written.columns == getattr(expected, name).columns


def test_coverage_in_sql_matches_polars_with_examples_without_target(tmp_path: Path) -> None:
    """Recommendation-style examples have no target: they count in the all-candidates share
    only, in the streamed statistics as in `coverage_stats`."""
    examples = examples_frame(
        [(0, 0, "train", 2, 2, [2, 3]), (1, 1, "test", 2, 3, [2, 3]), (2, 2, "test", 2, 0, [2])]
    ).with_columns(
        target_item_idx=pl.when(pl.col("example_id") == 2).then(None).otherwise("target_item_idx")
    )
    seqs = sequences_frame({u: [0, 1, 2, 3] for u in range(3)})
    whole = run(examples, seqs=seqs)
    stats = write_paths(examples, seqs, *graph_of_tiny(seqs)[1:], tmp_path / "out")
    keys = [k for k in whole.stats if k.startswith(("share", "mean"))]
    assert {k: stats[k] for k in keys} == pytest.approx({k: whole.stats[k] for k in keys})
    assert whole.stats["share_candidates_with_path"] != whole.stats["share_targets_with_path"]


def graph_of_tiny(seqs: pl.DataFrame | None = None) -> tuple:
    items, default_seqs = tiny_graph_inputs()
    seqs = default_seqs if seqs is None else seqs
    kg = build_kg(items, seqs)
    return seqs, kg.entities, kg.triples, kg.relations, items.height


def test_three_hop_paths_reach_the_prompt_through_their_item() -> None:
    from lkg_pipeline.core.llm.prompts import PromptConfig, build_prompts
    from lkg_pipeline.core.paths.selection import PathSelection, select_paths

    items, seqs = tiny_graph_inputs()
    three = run(EXAMPLE, PathConfig(max_hops=3, max_paths_per_pair=10))
    selected = select_paths(
        three.paths.filter(pl.col("hops") == 3), None, PathSelection(per_history_item=3)
    ).with_columns(variant=pl.lit("kg_rag"))
    titles = dict(items.select("item_idx", "title").iter_rows())
    prompt = build_prompts(
        EXAMPLE, seqs, titles, selected, "kg_rag", PromptConfig(), lambda t: len(t.split())
    )["prompt"][0]
    # history (1) A, (2) B; candidates (A) C, (B) D
    assert "(1) and (A): through B (2001): often rated by the same people, then both Comedy" in (
        prompt
    )
    assert "(2) and (A): through A (2000): often rated by the same people, then both from 2000" in (
        prompt
    )
