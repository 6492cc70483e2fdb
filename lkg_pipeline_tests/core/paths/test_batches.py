import dataclasses
from pathlib import Path

import polars as pl
import pytest

from benchmarks.paths.bench import QUICK_ITEMS, SHAPES, synthetic_inputs
from lkg_pipeline.core.paths.batches import bounded_user_batches, read_users, user_batches
from lkg_pipeline.core.paths.enumeration import PathConfig, signal_by_type, write_paths


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
    with pytest.raises(ValueError, match="rows_per_batch=0"):
        bounded_user_batches(counts, 3, 0)
