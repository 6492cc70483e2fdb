import dataclasses
from pathlib import Path

import polars as pl

from benchmarks.paths.bench import QUICK_ITEMS, SHAPES, synthetic_inputs
from lkg_pipeline.core.paths.batches import bounded_user_batches, rows_per_user
from lkg_pipeline.core.paths.enumeration import PathConfig, write_paths
from lkg_pipeline.core.paths.selection import (
    PathSelection,
    candidate_tie_key,
    examples_changed_by_candidate_order,
    paths_by_candidate_position,
    select_paths,
    selections_in_batches,
)
from lkg_pipeline_tests.core.paths.test_paths import EXAMPLE, run


def test_selection_by_fewest_hops_or_by_preference() -> None:
    out = run(EXAMPLE)
    shortest = select_paths(out.paths, None)
    assert shortest.select("history_item_idx", "path_type", "selection_rank").rows() == [
        (1, "co_rated", 1),
        (0, "released_in", 2),
    ]
    likes_genres = pl.DataFrame(
        {
            "user_idx": [0, 0, 0],
            "path_type": ["co_rated", "has_genre", "released_in"],
            "weight": [0.1, 0.8, 0.1],
        },
        schema_overrides={"user_idx": pl.Int32},
    )
    chosen = select_paths(out.paths, likes_genres)
    assert chosen.select("history_item_idx", "path_type").rows() == [
        (1, "has_genre"),
        (0, "released_in"),
    ]
    assert select_paths(out.paths, likes_genres, PathSelection(max_paths=1)).height == 1

    # Excluded types are never shown; the next path of the same history item takes the place,
    # and an item with no other path gets no line.
    both = out.paths.filter(pl.col("history_item_idx") == 1)["path_type"].unique().to_list()
    assert {"co_rated", "has_genre"} <= set(both)
    no_co = select_paths(out.paths, None, PathSelection(exclude_path_types=("co_rated",)))
    assert no_co.select("history_item_idx", "path_type").rows() == [
        (1, "has_genre"),
        (0, "released_in"),
    ]
    only_item_0 = select_paths(
        out.paths, likes_genres, PathSelection(exclude_path_types=tuple(both))
    )
    assert "co_rated" not in only_item_0["path_type"].to_list()
    assert only_item_0["history_item_idx"].to_list() == [0]
    assert only_item_0["selection_rank"].to_list() == [1]
    picked = out.paths.filter(pl.col("history_item_idx") == 0).row(0, named=True)
    assert only_item_0.row(0, named=True)["candidate_item_idx"] == picked["candidate_item_idx"]


def test_selection_under_a_path_budget_is_the_same_selection(tmp_path: Path) -> None:
    """Batches cut by a budget of enumerated paths select exactly what one batch selects, and
    no batch but a single user's passes the budget."""
    spec = dataclasses.replace(SHAPES["beauty-like"], n_items=QUICK_ITEMS["beauty-like"])
    inputs, _ = synthetic_inputs(spec, 25)
    graph = (inputs.entities, inputs.triples, inputs.relations, inputs.n_items)
    write_paths(inputs.examples, inputs.sequences, *graph, tmp_path, PathConfig(), 7)
    file = tmp_path / "paths.parquet"
    paths = pl.read_parquet(file)
    users = inputs.examples["user_idx"].unique()
    preferences = (
        pl.DataFrame({"user_idx": users})
        .join(paths.select(pl.col("path_type").unique()), how="cross")
        .with_columns(weight=(pl.col("user_idx") * 7 + pl.col("path_type").str.len_chars()) % 5)
    )
    counts = rows_per_user(file, pl.concat([users, pl.Series([999], dtype=users.dtype)]))
    assert counts.filter(pl.col("user_idx") == 999)["rows"].to_list() == [0]
    assert counts["rows"].sum() == paths.height
    assert (
        counts.join(paths.group_by("user_idx").len(), on="user_idx")
        .filter(pl.col("rows") != pl.col("len"))
        .is_empty()
    )
    budget = int(counts["rows"].max()) + 1
    whole = pl.concat(list(selections_in_batches(file, preferences, PathSelection(), 10**6)))
    parts = list(selections_in_batches(file, preferences, PathSelection(), 10**6, budget))
    assert len(parts) > 1
    assert pl.concat(parts).sort(pl.all()).equals(whole.sort(pl.all()))
    for batch in bounded_user_batches(counts, 10**6, budget):
        held = counts.filter(pl.col("user_idx").is_in(batch.implode()))["rows"].sum()
        assert held <= budget or batch.len() == 1


def test_selection_does_not_see_the_order_of_the_candidates() -> None:
    """Which candidate wins a tie must not depend on where it is listed: on val/test the list
    is the retriever's ranking, and the prompts would carry that rank to the LLM."""
    spec = dataclasses.replace(SHAPES["ml-100k-like"], n_items=QUICK_ITEMS["ml-100k-like"])
    inputs, _ = synthetic_inputs(spec, 15)
    paths = inputs.enumerate(PathConfig()).paths
    users = paths["user_idx"].unique()
    preferences = (
        pl.DataFrame({"user_idx": users})
        .join(paths.select(pl.col("path_type").unique()), how="cross")
        .with_columns(weight=(pl.col("path_type").str.len_chars() % 2).cast(pl.Float64))
    )
    examples = paths["example_id"].n_unique()
    leaky_rule = PathSelection(tie_break="candidate_order")
    for prefs in (None, preferences):
        assert examples_changed_by_candidate_order(paths, prefs, PathSelection()) == 0
        # the reference's rule (first listed wins) is what the check exists to catch
        leaky = examples_changed_by_candidate_order(paths, prefs, leaky_rule)
        assert leaky > examples // 2, (leaky, examples)
        # and hashing really changed who wins, not only made the rule order-free
        hashed, listed = (
            select_paths(paths, prefs, rule).select("example_id", "candidate_item_idx")
            for rule in (PathSelection(), leaky_rule)
        )
        assert not hashed.equals(listed)

    # The tie key: the same numbers every time, a different order in each example, and no
    # favourite position: over many examples the first listed candidate wins a 20-way tie
    # about 1 time in 20.
    def by_hand(example: int, candidate: int) -> int:
        m = 2**31 - 1
        x = (example * 1_103_515_245 + candidate + 1) % m
        x = (x * 48_271 + 12_345) % m
        return (x * x % m * 69_621 + x) % m

    pairs = [(7, 3), (7, 4), (8, 3), (8, 4), (10**9, 123_456)]
    ids = pl.DataFrame(pairs, orient="row", schema=["example_id", "candidate_item_idx"])
    key = ids.select(candidate_tie_key(pl.col("example_id"), pl.col("candidate_item_idx")))
    assert key.to_series().to_list() == [by_hand(e, c) for e, c in pairs]
    assert (key[0, 0] < key[1, 0]) != (key[2, 0] < key[3, 0])  # 3 vs 4: each wins once
    many = (
        pl.DataFrame({"example_id": range(4000)})
        .with_columns(candidate_item_idx=pl.int_ranges(0, 20), position=pl.int_ranges(0, 20))
        .explode("candidate_item_idx", "position")
    )
    # candidate ids in a scrambled order per example, as a retriever would list them
    many = many.with_columns(
        candidate_item_idx=(pl.col("candidate_item_idx") * 37 + pl.col("example_id") * 11) % 1000
    )
    winners = (
        many.with_columns(tie=candidate_tie_key(pl.col("example_id"), pl.col("candidate_item_idx")))
        .sort("example_id", "tie")
        .group_by("example_id", maintain_order=True)
        .first()
    )
    share_first = (winners["position"] == 0).mean()
    assert 0.03 < share_first < 0.075, share_first
    assert winners["position"].n_unique() == 20


def test_paths_by_candidate_position_counts_per_prompt() -> None:
    selected = pl.DataFrame(
        {
            "variant": ["kg_rag", "kg_rag", "kg_rag", "lkg_rag", "kg_rag"],
            "example_id": [1, 1, 2, 1, 3],
            "candidate_position": [0, 0, 1, 1, 0],
        }
    )
    table = paths_by_candidate_position(selected, pl.Series([1, 2]))  # example 3 not asked
    assert table.rows() == [(1, 1.0, 0.0), (2, 0.5, 0.5)]
    assert table.columns == ["candidate_position", "kg_rag", "lkg_rag"]
    assert table.schema["candidate_position"].is_integer()
