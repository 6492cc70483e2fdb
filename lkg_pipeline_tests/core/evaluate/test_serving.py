"""The served ranker: chosen on validation, the retriever unless beaten beyond the noise."""

import numpy as np
import polars as pl
import pytest

from lkg_pipeline.core.evaluate.recommend import next_item_examples, recommendation_table
from lkg_pipeline.core.evaluate.serving import (
    RETRIEVER,
    choose_served,
    fused_order,
    retriever_order,
    served_lines,
    served_summary,
    serving_plan,
)
from lkg_pipeline.core.llm.rank.fusion import cross_fitted_val_ranks, fused_ranks, val_folds
from lkg_pipeline_tests.core.evaluate.test_recommend import toy_sequences
from lkg_pipeline_tests.core.llm.test_fusion import _tables
from lkg_pipeline_tests.core.retrieval.test_retrieval import random_model


def val_ranks(**ranks: np.ndarray) -> pl.DataFrame:
    """RANK_COLUMNS rows on val for rankers given as per-user rank arrays."""
    frames = []
    for ranker, r in ranks.items():
        frames.append(
            pl.DataFrame(
                {
                    "ranker": ranker.replace("_prior", "+prior"),
                    "split": "val",
                    "user_idx": np.arange(len(r), dtype=np.int32),
                    "in_candidates": r <= 20,
                    "rank": r.astype(np.float64),
                }
            )
        )
    return pl.concat(frames)


RNG = np.random.default_rng(0)
BASE = RNG.integers(1, 40, size=400).astype(float)  # the retriever's ranks of 400 users


def test_a_worse_llm_is_never_served() -> None:
    worse = np.where(BASE <= 20, np.minimum(BASE + 3, 20), np.inf)
    choice = choose_served(val_ranks(retriever=BASE, lkg_rag=worse), n_permutations=2000)
    assert choice.served == RETRIEVER and choice.runner_up == "lkg_rag" and not choice.forced
    assert "no ranker beats the retriever" in choice.reason


def test_a_clearly_better_ranker_is_served_and_the_retriever_is_runner_up() -> None:
    better = np.where(BASE <= 20, 1.0, np.inf)  # the true item first whenever it is a candidate
    noisy = np.where(BASE <= 20, np.maximum(BASE - 1, 1), np.inf)
    choice = choose_served(
        val_ranks(retriever=BASE, llamarec=noisy, lkg_rag_prior=better), n_permutations=2000
    )
    assert choice.served == "lkg_rag+prior"
    assert choice.runner_up == "llamarec"  # next in validation order
    row = choice.evidence.filter(pl.col("ranker") == "lkg_rag+prior").row(0, named=True)
    assert row["delta_vs_retriever"] > 0 and row["p_vs_retriever"] < 0.05


def test_a_tie_and_a_gain_within_the_noise_go_to_the_retriever() -> None:
    tie = choose_served(val_ranks(retriever=BASE, kg_rag=BASE.copy()), n_permutations=2000)
    assert tie.served == RETRIEVER
    tiny = BASE.copy()
    first_hit = int(np.flatnonzero(BASE == 2)[0])
    tiny[first_hit] = 1.0  # one user of 400 one place better: higher mean, p far above 0.05
    noise = choose_served(val_ranks(retriever=BASE, kg_rag=tiny), n_permutations=2000)
    assert noise.evidence.filter(pl.col("ranker") == "kg_rag")["delta_vs_retriever"][0] > 0
    assert noise.served == RETRIEVER


def test_a_ranker_can_be_forced_by_name_and_an_unknown_one_is_refused() -> None:
    worse = np.where(BASE <= 20, 20.0, np.inf)
    ranks = val_ranks(retriever=BASE, llamarec=worse)
    forced = choose_served(ranks, forced="llamarec", n_permutations=200)
    assert forced.served == "llamarec" and forced.forced and forced.runner_up == RETRIEVER
    with pytest.raises(ValueError, match="'lkg_rag' cannot be served.*retriever, llamarec"):
        choose_served(ranks, forced="lkg_rag", n_permutations=200)


def test_rankers_on_different_users_are_an_error_and_non_servable_ones_are_ignored() -> None:
    ranks = val_ranks(retriever=BASE, lkg_rag=BASE[:-1].copy())
    with pytest.raises(ValueError, match="lkg_rag: validation ranks cover 399 users"):
        choose_served(ranks, n_permutations=200)
    best = np.ones_like(BASE)
    choice = choose_served(val_ranks(retriever=BASE, preference=best), n_permutations=200)
    assert choice.served == RETRIEVER and choice.evidence["ranker"].to_list() == [RETRIEVER]
    # a caller that names its own candidates (the quality benchmark's rows) gets them weighed
    named = choose_served(
        val_ranks(retriever=BASE, preference=best), n_permutations=200, servable=["preference"]
    )
    assert named.served == "preference" and named.runner_up == RETRIEVER


def test_the_summary_states_the_choice_and_the_served_test_row() -> None:
    choice = choose_served(val_ranks(retriever=BASE, lkg_rag=BASE + 1), n_permutations=200)
    summary = served_summary(choice, pl.DataFrame())
    lines = "\n".join(served_lines(summary))
    assert lines.startswith("**Served ranker: `retriever`**")
    assert "Runner-up on validation: `lkg_rag`" in lines and "| lkg_rag |" in lines


def test_serving_the_retriever_recommends_in_the_retrievers_order() -> None:
    sequences = toy_sequences()
    examples = next_item_examples(random_model(), sequences)
    ranked = retriever_order(examples)
    titles = {i: f"Film {i}" for i in range(60)}
    consumed = [[] for _ in range(examples.height)]
    table = recommendation_table(
        examples, ranked, None, titles, consumed, "lkg_rag", 10, "retriever"
    )
    for row in examples.iter_rows(named=True):
        mine = table.filter(pl.col("user_idx") == row["user_idx"]).sort("rank")
        assert mine["item_idx"].to_list() == row["candidate_item_idxs"][:10]
        assert mine["retriever_rank"].to_list() == list(range(1, 11))
    assert set(table["ranker"]) == {"retriever"}


def test_fused_order_is_the_retrievers_at_lambda_zero_and_the_llms_at_a_large_lambda() -> None:
    rankings, candidates = _tables()
    candidates = candidates.with_columns(user_idx=pl.Series([0, 1, 2, 3], dtype=pl.Int32))
    at_zero = fused_order(rankings, candidates, 0.0, None)
    assert at_zero["ranked_item_idxs"].to_list() == [[7, 8, 9], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
    large = fused_order(rankings, candidates, 1000.0, None)
    assert large["ranked_item_idxs"].to_list()[:3] == rankings["ranked_item_idxs"].to_list()[:3]
    assert large["user_idx"].to_list() == [0, 1, 2, 3]


def test_cross_fitted_fusion_never_chooses_lambda_on_the_example_it_ranks() -> None:
    # Val examples of kind A (ids 10, 14) need λ > 0.2 to put their true item first, kind B
    # (11, 15) need λ > 1. In sample (λ chosen on all four, `fused_ranks`) all come first.
    # Cross-fitted, a B example is ranked with the λ its other fold chose: 0.3 if that fold
    # holds only As, and then its true item comes second.
    rankings, candidates = _tables()
    twins = {"example_id": pl.col("example_id") + 4}
    rankings = pl.concat(
        [rankings, rankings.filter(pl.col("split") == "val").with_columns(**twins)]
    )
    candidates = pl.concat(
        [candidates, candidates.filter(pl.col("split") == "val").with_columns(**twins)]
    )
    in_sample, _ = fused_ranks(rankings, candidates)
    assert (
        in_sample.filter(pl.col("example_id").is_in([10, 11, 14, 15]))["rank"].to_list()
        == [1.0] * 4
    )
    kind = {10: "A", 11: "B", 14: "A", 15: "B"}
    order = [10, 11, 14, 15]  # val examples in letter_scores' order
    seeds_apart = 0
    for seed in range(8):
        fold = dict(zip(order, val_folds(4, 2, seed)))
        crossed = cross_fitted_val_ranks(rankings, candidates, n_folds=2, seed=seed)
        assert crossed is not None and crossed["example_id"].to_list() == order
        for example, rank in zip(crossed["example_id"], crossed["rank"]):
            others = {kind[e] for e in order if fold[e] != fold[example]}
            expected = 2.0 if kind[example] == "B" and others == {"A"} else 1.0
            assert rank == expected, (seed, example)
        seeds_apart += len({kind[e] for e in order if fold[e] == 0}) == 1
    assert seeds_apart > 0  # some seed put the kinds in different folds
    assert cross_fitted_val_ranks(rankings, candidates, n_folds=3) is None  # < 2 per fold


def test_the_retriever_can_be_served_before_any_report_and_nothing_else_can(tmp_path) -> None:
    report = tmp_path / "evaluation.json"
    plan = serving_plan(report, "ml-100k", "retriever")  # no LLM stage has run
    assert plan["ranker"] == "retriever" and plan["variant"] is None and plan["forced"]
    for forced in (None, "lkg_rag"):
        with pytest.raises(FileNotFoundError, match="materialise evaluation_report"):
            serving_plan(report, "ml-100k", forced)
