import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from lkg_pipeline.core.evaluate.ltr import (
    LtrConfig,
    LtrResult,
    fit_ltr,
    load_ltr,
    ranks_from_scores,
    save_ltr,
    score,
)
from lkg_pipeline.core.evaluate.ltr_features import feature_names, feature_table
from lkg_pipeline.core.evaluate.metrics import ranking_metrics
from lkg_pipeline_tests.core.evaluate.test_ltr_features import (
    CANDIDATE_SCHEMA,
    PAIR_SCHEMA,
    TYPES,
)

# Small enough for a few seconds a fit on 2 cores; the planted signal needs few trees.
CONFIG = LtrConfig(n_estimators=200, early_stopping_rounds=20, seed=3, num_threads=1)


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
