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
    PathSelection,
    bounded_user_batches,
    candidate_tie_key,
    enumerate_paths,
    examples_changed_by_candidate_order,
    paths_by_candidate_position,
    read_users,
    rows_per_user,
    select_paths,
    selections_in_batches,
    signal_by_type,
    user_batches,
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
    # B -co_rated-> A -released_in-> 2000 <- C
    assert extra.select("history_item_idx", "path_type", "relations", "via_name").rows() == [
        (0, "co_rated", ["co_rated", "has_genre", "genre_of"], "Comedy"),
        (0, "has_genre", ["has_genre", "genre_of", "co_rated"], "Drama"),
        (1, "co_rated", ["co_rated", "released_in", "release_year_of"], "2000"),
    ]
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


@pytest.mark.parametrize("shape", ["ml-100k-like", "beauty-like"])
def test_write_paths_in_user_batches_equals_enumerate_paths(tmp_path: Path, shape: str) -> None:
    """Streaming a batch of users at a time changes neither a row nor a statistic."""
    spec = dataclasses.replace(SHAPES[shape], n_items=QUICK_ITEMS[shape])
    inputs, _ = synthetic_inputs(spec, 25)
    config = PathConfig(max_hops=3)  # every query, 3-hop ones included
    graph = (inputs.entities, inputs.triples, inputs.relations, inputs.n_items)
    whole = enumerate_paths(inputs.examples, inputs.sequences, *graph, config)
    assert whole.paths.height > 0 and whole.history_profile.height > 0
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


def test_read_users_takes_a_batch_of_users_from_the_written_tables(tmp_path: Path) -> None:
    """Readers after kg_paths take a batch of users at a time: in file order, nothing lost or
    repeated, whichever batch size the reader uses; a table without user_idx is refused."""
    spec = dataclasses.replace(SHAPES["beauty-like"], n_items=QUICK_ITEMS["beauty-like"])
    inputs, _ = synthetic_inputs(spec, 25)
    graph = (inputs.entities, inputs.triples, inputs.relations, inputs.n_items)
    write_paths(inputs.examples, inputs.sequences, *graph, tmp_path, PathConfig(), 7)
    user_of = inputs.examples.select("example_id", "user_idx")
    for name in ("paths", "pair_features", "history_profile"):
        file = tmp_path / f"{name}.parquet"
        whole = pl.read_parquet(file)
        assert whole.height > 0, name
        if "example_id" in whole.columns:  # each row's user is its example's
            joined = whole.join(user_of, on="example_id", suffix="_of_example")
            assert joined.height == whole.height
            assert (joined["user_idx"] == joined["user_idx_of_example"]).all(), name
        for per_batch in (7, 5):  # the writer's batches, and others
            batches = user_batches(inputs.examples, per_batch)
            parts = [read_users(file, users) for users in batches]
            for users, part in zip(batches, parts):
                assert part.equals(whole.filter(pl.col("user_idx").is_in(users.implode())))
            assert pl.concat(parts).sort(pl.all()).equals(whole.sort(pl.all())), name
        assert read_users(file, pl.Series([999], dtype=pl.Int32)).height == 0
        assert read_users(file, batches[0], ["user_idx"]).columns == ["user_idx"]
    # kg_paths' signal table, a batch of users at a time from the file: the same shares
    features = pl.read_parquet(tmp_path / "pair_features.parquet")
    in_memory = signal_by_type(inputs.examples, features).sort("path_type")
    assert in_memory.height >= 2 and (in_memory["targets"] > 0).all()
    for per_batch in (7, 5, 100):
        batched = signal_by_type(inputs.examples, tmp_path / "pair_features.parquet", per_batch)
        assert batched.sort("path_type").equals(in_memory), per_batch
    whole.drop("user_idx").write_parquet(tmp_path / "old.parquet")
    with pytest.raises(ValueError, match="no user_idx column.*re-materialise kg_paths"):
        read_users(tmp_path / "old.parquet", batches[0])


def test_bounded_user_batches_cut_by_users_and_by_rows() -> None:
    counts = pl.DataFrame(
        {"user_idx": [5, 1, 3, 2, 4], "rows": [1, 4, 0, 2, 9]},
        schema={"user_idx": pl.Int32, "rows": pl.UInt32},
    )

    def cut(users: int, rows: int | None) -> list[list[int]]:
        return [b.to_list() for b in bounded_user_batches(counts, users, rows)]

    # users 1..5 hold 4, 2, 0, 9, 1 rows
    assert cut(10, None) == [[1, 2, 3, 4, 5]]
    assert cut(2, None) == [[1, 2], [3, 4], [5]]
    assert cut(10, 6) == [[1, 2, 3], [4], [5]]  # 4 + 2 + 0 fits; user 4 alone exceeds 6
    assert cut(2, 6) == [[1, 2], [3], [4], [5]]
    assert cut(10, 1) == [[1], [2], [3], [4], [5]]  # 2 is over the budget alone: 3 starts anew
    assert cut(10, 4) == [[1], [2, 3], [4], [5]]
    assert cut(10, 10**9) == [[1, 2, 3, 4, 5]]
    assert bounded_user_batches(counts.head(0), 3, 5) == []
    with pytest.raises(AssertionError, match="rows_per_batch=0"):
        bounded_user_batches(counts, 3, 0)


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
