import math
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from lkg_pipeline.core.evaluate.ltr_features import (
    ID_COLUMNS,
    feature_names,
    feature_table,
    read_pair_features,
)

CANDIDATE_SCHEMA = {
    "example_id": pl.Int64,
    "user_idx": pl.Int32,
    "split": pl.String,
    "prefix_len": pl.Int32,
    "target_item_idx": pl.Int32,
    "candidate_item_idxs": pl.List(pl.Int32),
    "candidate_scores": pl.List(pl.Float32),
}
PAIR_SCHEMA = {
    "example_id": pl.Int64,
    "candidate_item_idx": pl.Int32,
    "path_type": pl.String,
    "n_paths": pl.Int32,
}
TYPES = ["directed_by", "has_genre", "starring"]


# --- the feature table on a hand-made example --------------------------------------------------


def tiny_inputs() -> dict[str, pl.DataFrame]:
    """User 0 watched 10, 11, 12 then 13 (val), 14 (test); user 1 watched 20, 21, 22 (val),
    23 (test). Item i has i train interactions."""
    sequences = pl.DataFrame(
        {
            "user_idx": [0] * 5 + [1] * 4,
            "item_idx": [10, 11, 12, 13, 14, 20, 21, 22, 23],
            "position": [0, 1, 2, 3, 4, 0, 1, 2, 3],
            "split": ["train"] * 3 + ["val", "test"] + ["train"] * 2 + ["val", "test"],
        }
    )
    candidates = pl.DataFrame(
        {
            "example_id": [0, 1, 2],
            "user_idx": [0, 1, 0],
            "split": ["val", "val", "test"],
            "prefix_len": [3, 2, 4],
            "target_item_idx": [13, 22, 14],
            # example 0: a tie at the top; example 2: the true item is not a candidate
            "candidate_item_idxs": [[13, 30, 31], [32, 33, 22, 34], [30, 35]],
            "candidate_scores": [[2.5, 2.5, 1.0], [4.0, 3.0, 0.5, -1.0], [1.5, 0.5]],
        },
        schema=CANDIDATE_SCHEMA,
    )
    pair_features = pl.DataFrame(
        [
            (0, 13, "directed_by", 2),
            (0, 13, "has_genre", 5),
            (0, 31, "has_genre", 1),
            (1, 22, "starring", 3),
            (1, 33, "has_genre", 2),
            (1, 33, "has_genre", 1),  # a duplicate adds up
            (1, 99, "starring", 7),  # not a candidate of example 1: ignored
            (7, 13, "directed_by", 4),  # another example: ignored
        ],
        schema=PAIR_SCHEMA,
        orient="row",
    )
    items = pl.DataFrame({"item_idx": range(40), "n_train_interactions": range(40)})
    return {
        "candidates": candidates,
        "sequences": sequences,
        "pair_features": pair_features,
        "item_popularity": items,
    }


def test_feature_table_matches_hand_computed_values() -> None:
    inputs = tiny_inputs()
    cells = inputs["candidates"].explode("candidate_item_idxs")
    keys = cells.select("example_id", candidate_item_idx="candidate_item_idxs")
    preference = keys.with_columns(score=pl.col("candidate_item_idx") / 10 + pl.col("example_id"))
    llm = keys.with_columns(llm_score=-pl.col("candidate_item_idx").cast(pl.Float64))
    table = feature_table(**inputs, preference_scores=preference, llm_scores=llm, path_types=TYPES)

    lp = math.log1p
    h0, h1, h2 = (
        (lp(10) + lp(11) + lp(12)) / 3,
        (lp(20) + lp(21)) / 2,
        sum(map(lp, range(10, 14))) / 4,
    )
    # (example, user, split, position, item, label, score, rank, margin, vs mean, log pop,
    #  pop gap, history len, directed_by, has_genre, starring, total)
    rows = [
        (0, 0, "val", 0, 13, 1, 2.5, 1, 0.0, 0.5, lp(13), lp(13) - h0, 3, 2, 5, 0, 7),
        (0, 0, "val", 1, 30, 0, 2.5, 2, 0.0, 0.5, lp(30), lp(30) - h0, 3, 0, 0, 0, 0),
        (0, 0, "val", 2, 31, 0, 1.0, 3, 1.5, -1.0, lp(31), lp(31) - h0, 3, 0, 1, 0, 1),
        (1, 1, "val", 0, 32, 0, 4.0, 1, 0.0, 2.375, lp(32), lp(32) - h1, 2, 0, 0, 0, 0),
        (1, 1, "val", 1, 33, 0, 3.0, 2, 1.0, 1.375, lp(33), lp(33) - h1, 2, 0, 3, 0, 3),
        (1, 1, "val", 2, 22, 1, 0.5, 3, 3.5, -1.125, lp(22), lp(22) - h1, 2, 0, 0, 3, 3),
        (1, 1, "val", 3, 34, 0, -1.0, 4, 5.0, -2.625, lp(34), lp(34) - h1, 2, 0, 0, 0, 0),
        (2, 0, "test", 0, 30, 0, 1.5, 1, 0.0, 0.5, lp(30), lp(30) - h2, 4, 0, 0, 0, 0),
        (2, 0, "test", 1, 35, 0, 0.5, 2, 1.0, -0.5, lp(35), lp(35) - h2, 4, 0, 0, 0, 0),
    ]
    names = [
        *ID_COLUMNS[:5], "label", "retriever_score", "retriever_rank", "score_margin",
        "score_vs_mean", "log_popularity", "popularity_gap", "history_len",
        "paths_directed_by", "paths_has_genre", "paths_starring", "paths_total",
    ]  # fmt: skip
    expected = pl.DataFrame(rows, schema=names, orient="row").with_columns(
        preference_score=pl.col("candidate_item_idx") / 10 + pl.col("example_id"),
        llm_score=-pl.col("candidate_item_idx").cast(pl.Float64),
    )
    assert table.columns == expected.columns
    assert_frame_equal(table, expected, check_dtypes=False, rel_tol=1e-12)
    assert feature_names(table) == names[6:] + ["preference_score", "llm_score"]
    assert feature_names(table, exclude=["llm_score"])[-1] == "preference_score"


def test_feature_table_path_columns_follow_the_vocabulary() -> None:
    inputs = tiny_inputs()
    found = feature_table(**inputs)  # default: the types present in the examples' pairs
    assert [c for c in found.columns if c.startswith("paths_")] == [
        "paths_directed_by", "paths_has_genre", "paths_starring", "paths_total",
    ]  # fmt: skip
    wider = feature_table(**inputs, path_types=[*TYPES, "written_by"])
    assert (wider["paths_written_by"] == 0).all()
    assert_frame_equal(wider.drop("paths_written_by"), found)


def test_feature_table_rejects_what_it_cannot_use() -> None:
    inputs = tiny_inputs()
    train = inputs["candidates"].with_columns(
        split=pl.lit("train"), candidate_scores=pl.lit(None, CANDIDATE_SCHEMA["candidate_scores"])
    )
    with pytest.raises(ValueError, match="retriever score"):
        feature_table(**(inputs | {"candidates": train}))
    with pytest.raises(ValueError, match="starring"):
        feature_table(**inputs, path_types=["directed_by", "has_genre"])
    partial = pl.DataFrame(
        {"example_id": [0], "candidate_item_idx": [13], "score": [1.0]},
    )
    with pytest.raises(ValueError, match="8 of 9 candidates have no score"):
        feature_table(**inputs, preference_scores=partial)
    with pytest.raises(ValueError, match="item_popularity lacks"):
        feature_table(**(inputs | {"item_popularity": inputs["item_popularity"].head(31)}))


def test_read_pair_features_keeps_the_examples_asked_for(tmp_path: Path) -> None:
    stored = tiny_inputs()["pair_features"].with_columns(user_idx=pl.lit(0, pl.Int32))
    stored.write_parquet(tmp_path / "pair_features.parquet")
    read = read_pair_features(tmp_path, pl.Series([1, 5]))
    assert read.columns == list(PAIR_SCHEMA)
    assert_frame_equal(read, stored.filter(pl.col("example_id") == 1).drop("user_idx"))
