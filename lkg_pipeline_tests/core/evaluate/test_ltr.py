import dataclasses
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from lkg_pipeline.core.evaluate.ltr import (
    ID_COLUMNS,
    LtrConfig,
    LtrResult,
    feature_names,
    feature_table,
    fit_ltr,
    load_ltr,
    ranks_from_scores,
    read_pair_features,
    save_ltr,
    score,
)
from lkg_pipeline.core.evaluate.metrics import ranking_metrics

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
# Small enough for a few seconds a fit on 2 cores; the planted signal needs few trees.
CONFIG = LtrConfig(n_estimators=200, early_stopping_rounds=20, seed=3, num_threads=1)


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


# --- learning on synthetic examples -----------------------------------------------------------


def synthetic(n_users: int, signal: bool, seed: int = 0) -> pl.DataFrame:
    """A feature table through `feature_table`: one val and one test example per user,
    20 candidates in retriever order, the true item among them in 80% of examples and more
    often near the top. With `signal`, a `directed_by` path reaches the true item in 80% of
    examples and any other candidate in 10%; without, every candidate in 15%. `has_genre`
    paths are noise everywhere."""
    rng = np.random.default_rng(seed)
    n_items, history, k = 400, 5, 20
    weights = 1 / np.arange(1, k + 1) ** 0.7
    seqs, cands, pairs = [], [], []
    for u in range(n_users):
        items = rng.choice(n_items, history + 2, replace=False)
        seqs += [(u, int(i), p) for p, i in enumerate(items)]
        for s, split in enumerate(("val", "test")):
            prefix, target = history + s, int(items[history + s])
            pool = np.setdiff1d(np.arange(n_items), items)
            listed = rng.choice(pool, k, replace=False)
            if rng.random() < 0.8:
                listed[rng.choice(k, p=weights / weights.sum())] = target
            scores = np.sort(rng.normal(size=k))[::-1]
            example = s * n_users + u
            cands.append((example, u, split, prefix, target, listed.tolist(), scores.tolist()))
            for c in listed.tolist():
                p = (0.8 if c == target else 0.1) if signal else 0.15
                if rng.random() < p:
                    pairs.append((example, c, "directed_by", 1 + int(rng.poisson(1))))
                if genre := int(rng.poisson(4)):
                    pairs.append((example, c, "has_genre", genre))
    sequences = pl.DataFrame(seqs, schema=["user_idx", "item_idx", "position"], orient="row")
    items = pl.DataFrame(
        {"item_idx": range(n_items), "n_train_interactions": rng.poisson(20, n_items)}
    )
    candidates = pl.DataFrame(cands, schema=CANDIDATE_SCHEMA, orient="row").sort("example_id")
    pair_features = pl.DataFrame(pairs, schema=PAIR_SCHEMA, orient="row")
    return feature_table(candidates, sequences, pair_features, items, path_types=TYPES[:2])


def ndcg10(features: pl.DataFrame, scores: np.ndarray) -> float:
    ranks = ranks_from_scores(features, scores)["rank"].to_numpy()
    return ranking_metrics(ranks, ks=(10,))["NDCG@10"]


def val_rows(features: pl.DataFrame) -> pl.DataFrame:
    return features.filter(pl.col("split") == "val")


@pytest.fixture(scope="module")
def planted() -> tuple[pl.DataFrame, LtrResult]:
    features = synthetic(400, signal=True)
    return features, fit_ltr(features, feature_names(features), CONFIG)


def test_a_planted_path_signal_is_learnt_honestly(planted: tuple[pl.DataFrame, LtrResult]) -> None:
    features, result = planted
    val = val_rows(features)
    cross_fitted = ndcg10(val, result.val_scores["score"].to_numpy())
    retriever = ndcg10(val, val["retriever_score"].to_numpy())
    assert cross_fitted > retriever + 0.15, (cross_fitted, retriever)
    test = features.filter(pl.col("split") == "test")
    assert ndcg10(test, score(result, test)) > ndcg10(test, test["retriever_score"]) + 0.15
    assert result.importances["feature"][0] == "paths_directed_by"
    assert len(result.best_iterations) == CONFIG.n_folds
    assert result.val_scores["fold"].n_unique() == CONFIG.n_folds


def test_no_signal_no_gain() -> None:
    """Where no feature says more than the retriever, the learnt order is no better than the
    retriever's; boosting from the retriever's score keeps it close to it."""
    features = synthetic(400, signal=False, seed=1)
    val = val_rows(features)
    retriever = ndcg10(val, val["retriever_score"].to_numpy())
    from_zero = fit_ltr(features, feature_names(features), CONFIG)
    plain = ndcg10(val, from_zero.val_scores["score"].to_numpy())
    assert plain < retriever + 0.03, (plain, retriever)
    boosted = dataclasses.replace(CONFIG, init_score_column="retriever_score")
    from_retriever = fit_ltr(features, feature_names(features), boosted)
    residual = ndcg10(val, from_retriever.val_scores["score"].to_numpy())
    assert plain < residual < retriever + 0.03, (plain, residual, retriever)
    assert residual > retriever - 0.03, (residual, retriever)


def test_boosting_from_the_retriever_still_learns_and_round_trips(
    planted: tuple[pl.DataFrame, LtrResult], tmp_path: Path
) -> None:
    features, _ = planted
    config = dataclasses.replace(CONFIG, init_score_column="retriever_score")
    result = fit_ltr(features, feature_names(features), config)
    val = val_rows(features)
    cross_fitted = ndcg10(val, result.val_scores["score"].to_numpy())
    assert cross_fitted > ndcg10(val, val["retriever_score"].to_numpy()) + 0.15
    test = features.filter(pl.col("split") == "test")
    loaded = load_ltr(save_ltr(result, tmp_path / "ltr"))
    assert loaded.config.init_score_column == "retriever_score"
    np.testing.assert_array_equal(score(loaded, test), score(result, test))
    trees = result.booster.predict(test.select(result.feature_columns).to_numpy(), num_threads=1)
    base = test["retriever_score"].to_numpy()
    np.testing.assert_array_equal(score(result, test), trees + base)


def test_a_fold_is_scored_by_a_model_that_never_saw_it(
    planted: tuple[pl.DataFrame, LtrResult],
) -> None:
    """Move the label of every example of fold 0 to another candidate: fold 0's scores stay
    the same to the bit (its model never saw those users, not even to stop); the folds whose
    models were fitted on fold 0 change; the last fold's model was only stopped on fold 0, so
    its scores change exactly when its best iteration does."""
    features, result = planted
    fold0 = result.val_scores.filter(pl.col("fold") == 0)["user_idx"].unique().implode()
    moved = (pl.col("split") == "val") & pl.col("user_idx").is_in(fold0)
    flipped = features.with_columns(
        label=pl.when(moved)
        .then(pl.col("label").shift(1).over("example_id").fill_null(0))
        .otherwise(pl.col("label"))
    )
    assert (flipped["label"] != features["label"]).sum() > 50
    again = fit_ltr(flipped, result.feature_columns, CONFIG)
    before, after = result.val_scores, again.val_scores
    same = (before["score"] == after["score"]).to_numpy()
    in_fold0 = (before["fold"] == 0).to_numpy()
    assert same[in_fold0].all()
    for k in range(1, CONFIG.n_folds - 1):
        assert not same[(before["fold"] == k).to_numpy()].all(), f"fold {k} did not change"
    last = CONFIG.n_folds - 1
    stopped_alike = again.best_iterations[last] == result.best_iterations[last]
    assert same[(before["fold"] == last).to_numpy()].all() == stopped_alike


def test_fitting_is_deterministic_and_survives_a_round_trip(
    planted: tuple[pl.DataFrame, LtrResult], tmp_path: Path
) -> None:
    features, result = planted
    test = features.filter(pl.col("split") == "test")
    again = fit_ltr(features, result.feature_columns, CONFIG)
    assert_frame_equal(again.val_scores, result.val_scores)
    assert again.best_iterations == result.best_iterations
    np.testing.assert_array_equal(score(again, test), score(result, test))

    loaded = load_ltr(save_ltr(result, tmp_path / "ltr"))
    np.testing.assert_array_equal(score(loaded, test), score(result, test))
    assert loaded.config == result.config
    assert loaded.feature_columns == result.feature_columns
    assert loaded.best_iterations == result.best_iterations
    assert_frame_equal(loaded.val_scores, result.val_scores)
    assert_frame_equal(loaded.importances, result.importances)


def test_ranks_break_ties_towards_the_earlier_candidate() -> None:
    features = pl.DataFrame(
        {
            "example_id": [0, 0, 0, 1, 1, 1, 2, 2],
            "position": [0, 1, 2, 0, 1, 2, 0, 1],
            "label": [0, 1, 0, 1, 0, 0, 0, 0],  # example 2: no true item among the candidates
        }
    )
    ranks = ranks_from_scores(features, np.array([1.0, 1.0, 2.0, 0.5, 0.5, 0.7, 1.0, 0.0]))
    assert ranks.to_dicts() == [{"example_id": 0, "rank": 3}, {"example_id": 1, "rank": 2}]


def test_clear_errors(planted: tuple[pl.DataFrame, LtrResult]) -> None:
    features, result = planted
    columns = result.feature_columns
    with pytest.raises(ValueError, match="paths_total"):
        fit_ltr(features.drop("paths_total"), columns, CONFIG)
    with pytest.raises(ValueError, match="paths_total"):
        score(result, features.drop("paths_total"))
    first = features["example_id"][0]
    two_positives = features.with_columns(
        label=pl.when(pl.col("example_id") == first).then(1).otherwise(pl.col("label"))
    )
    with pytest.raises(ValueError, match="more than one label-1 row"):
        fit_ltr(two_positives, columns, CONFIG)
    with pytest.raises(ValueError, match="more than one label-1 row"):
        ranks_from_scores(two_positives, np.zeros(features.height))
    with pytest.raises(ValueError, match="need more users than n_folds"):
        fit_ltr(features.filter(pl.col("user_idx") < 3), columns, CONFIG)
