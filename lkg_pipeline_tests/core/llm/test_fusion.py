"""Calibration and retriever fusion, checked by hand on small arrays and on ranking tables."""

import math

import numpy as np
import polars as pl
import pytest

from lkg_pipeline.core.llm.rank.fusion import (
    calibrated,
    choose_fusion,
    fused,
    fused_ranks,
    letter_prior,
    letter_scores,
    log_softmax,
    target_ranks,
)


def test_log_softmax_and_fusion_arithmetic_by_hand() -> None:
    llm = np.array([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    retriever = np.array([[math.log(3.0), 0.0]])  # 3/4, 1/4
    np.testing.assert_allclose(np.exp(log_softmax(llm)), [[0.25, 0.75]])
    np.testing.assert_allclose(log_softmax(llm + 1000.0), log_softmax(llm))  # stable
    np.testing.assert_allclose(fused(llm, retriever, 0.0), log_softmax(retriever))
    expected = np.log([[0.75, 0.25]]) + 2.0 * np.log([[0.25, 0.75]])
    np.testing.assert_allclose(fused(llm, retriever, 2.0), expected)
    # the prior is the mean log-probability per letter; calibration subtracts it
    many = np.array([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    prior = letter_prior(many)
    np.testing.assert_allclose(prior, [0.5 * (math.log(0.25) + math.log(0.75))] * 2)
    np.testing.assert_allclose(calibrated(many, prior), log_softmax(many) - prior)
    with_prior = fused(llm, retriever, 1.0, prior)
    np.testing.assert_allclose(with_prior, log_softmax(retriever) + log_softmax(llm) - prior)


def test_target_ranks_break_ties_towards_the_earlier_letter() -> None:
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 2.0, 1.0]])
    assert target_ranks(scores, np.array([1, 2, 2])).tolist() == [2, 2, 3]
    assert target_ranks(scores, np.array([0, 1, 0])).tolist() == [1, 1, 1]


def test_calibration_removes_a_letter_bias() -> None:
    """An LLM whose content signal is real but drowned by a large bias towards letter 0."""
    rng = np.random.default_rng(0)
    n, c = 400, 20
    target = rng.integers(0, c, n)
    llm = rng.normal(0, 1, (n, c))
    llm[np.arange(n), target] += 2.0  # content
    llm[:, 0] += 10.0  # position bias: letter 0 always wins
    retriever = np.zeros((n, c))  # uninformative: all the signal is the LLM's
    raw = target_ranks(llm, target)
    assert (raw[target != 0] > 1).all()  # the bias wins every prompt
    choice = choose_fusion(llm, retriever, target)
    assert choice.calibrate and choice.lam > 0
    fixed = target_ranks(fused(llm, retriever, choice.lam, choice.prior), target)
    assert (fixed == 1).mean() > 0.4 > (raw == 1).mean()


def test_lambda_zero_wins_when_the_llm_is_noise_and_ties_go_to_the_retriever() -> None:
    rng = np.random.default_rng(1)
    n, c = 300, 20
    target = rng.integers(0, c, n)
    retriever = rng.normal(0, 1, (n, c))
    retriever[np.arange(n), target] += 1.5
    noise = rng.normal(0, 3, (n, c))
    choice = choose_fusion(noise, retriever, target)
    best = choice.grid.filter(pl.col("lam") == 0.0)["NDCG@10"][0]
    assert choice.grid["NDCG@10"].max() - best < 0.01  # noise barely helps if at all
    constant = np.zeros((n, c))  # an LLM that says nothing: every λ ties, λ = 0 is chosen
    tie = choose_fusion(constant, retriever, target)
    assert tie.lam == 0.0 and not tie.calibrate
    assert "λ = 0" in tie.describe()


def _tables() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Two val and two test examples with 3 candidates; the LLM's scores best first."""
    candidates = pl.DataFrame(
        {
            "example_id": [10, 11, 12, 13],
            "split": ["val", "val", "test", "test"],
            "candidate_item_idxs": [[7, 8, 9], [1, 2, 3], [4, 5, 6], [7, 8, 9]],
            "candidate_scores": [
                [3.0, 2.0, 1.0],
                [3.0, 2.0, 1.0],
                [3.0, 2.0, 1.0],
                [0.0, 0.0, 0.0],
            ],
        },
        schema_overrides={"candidate_scores": pl.List(pl.Float32)},
    )
    rankings = pl.DataFrame(
        {
            "example_id": [10, 11, 12, 13],
            "split": ["val", "val", "test", "test"],
            "ranked_item_idxs": [[9, 8, 7], [2, 1, 3], [6, 5, 4], [8, 9, 7]],
            "ranked_scores": [[5.0, 0.0, -5.0], [4.0, 3.0, 0.0], [9.0, 1.0, 0.0], [2.0, 1.0, 0.0]],
            "target_item_idx": [9, 2, 6, None],
            "target_rank": [1, 1, 1, None],
        },
        schema_overrides={"target_item_idx": pl.Int32},
    )
    return rankings, candidates


def test_letter_scores_put_each_score_back_under_its_letter() -> None:
    rankings, candidates = _tables()
    rows = letter_scores(rankings, candidates)
    assert rows["llm"].to_list() == [
        [-5.0, 0.0, 5.0],
        [3.0, 4.0, 0.0],
        [0.0, 1.0, 9.0],
        [0.0, 2.0, 1.0],
    ]
    assert rows["target_index"].to_list() == [2, 1, 2, -1]
    assert rows["retriever"][0].to_list() == [3.0, 2.0, 1.0]


def test_fused_ranks_choose_lambda_on_val_and_rank_every_known_example() -> None:
    rankings, candidates = _tables()
    ranked, choice = fused_ranks(rankings, candidates)
    # on val the LLM is right and the retriever wrong: a large λ is chosen
    assert choice.lam > 0
    assert ranked["example_id"].to_list() == [10, 11, 12]  # 13's true item is no candidate
    assert ranked["rank"].to_list() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="rank the val"):
        fused_ranks(rankings.filter(pl.col("split") == "test"), candidates)
