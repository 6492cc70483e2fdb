"""Evaluation arithmetic: metrics by hand, subset vs overall, intervals that cover, tests that
reject at their level, and a report whose verdicts say what the tables say."""

import json
import math

import numpy as np
import polars as pl
import pytest

from lkg_pipeline.core.evaluate.compare import (
    EvaluationConfig,
    _baselines,
    bootstrap_intervals,
    dumps,
    evaluate,
    llm_ranks,
    paired_randomization_test,
    report_dict,
    report_markdown,
    retriever_ranks,
    verdicts,
)
from lkg_pipeline.core.evaluate.metrics import per_user_metrics, ranking_metrics
from lkg_pipeline.core.paths.preference.ranking import example_ranks


def test_per_user_metrics_by_hand_with_k_beyond_the_list_and_absent_items() -> None:
    ranks = np.array([1, 2, 20, np.inf])  # 20 candidates: rank 20 is the last, inf is absent
    m = per_user_metrics(ranks, ks=(1, 10, 50))
    np.testing.assert_allclose(m["MRR@1"], [1, 0, 0, 0])
    np.testing.assert_allclose(m["MRR@10"], [1, 0.5, 0, 0])
    np.testing.assert_allclose(m["NDCG@10"], [1, 1 / math.log2(3), 0, 0])
    # k = 50 is longer than any list: every ranked item counts, the absent one never does
    np.testing.assert_allclose(m["Recall@50"], [1, 1, 1, 0])
    np.testing.assert_allclose(m["MRR@50"], [1, 0.5, 0.05, 0])
    np.testing.assert_allclose(m["NDCG@50"], [1, 1 / math.log2(3), 1 / math.log2(21), 0])
    means = ranking_metrics(ranks, ks=(1, 10, 50))
    assert means == pytest.approx({k: float(v.mean()) for k, v in m.items()})


def test_ties_go_to_the_earlier_candidate() -> None:
    examples = pl.DataFrame(
        {
            "example_id": [0, 1],
            "user_idx": [0, 1],
            "split": ["test", "test"],
            "target_item_idx": [13, 99],
            "candidate_item_idxs": [[10, 11, 12, 13], [10, 11, 12, 13]],
        }
    )
    scores = examples.select(
        "example_id", candidate_item_idx=pl.col("candidate_item_idxs"), score=pl.lit([0.0] * 4)
    ).explode("candidate_item_idx", "score")
    ranked = example_ranks(examples, scores)
    # all four tie: the target (last in the list) ranks 4th; an absent target is not ranked
    assert ranked["rank"].to_list() == [4.0, math.inf]


def candidates_frame(in_candidates: list[bool], target_rank: list[int]) -> pl.DataFrame:
    """`candidates` test rows, one per user (only the columns the evaluation reads)."""
    n = len(in_candidates)
    return pl.DataFrame(
        {
            "example_id": np.arange(n) + 100,
            "user_idx": np.arange(n),
            "split": ["test"] * n,
            "target_rank": target_rank,
            "in_candidates": in_candidates,
        },
        schema_overrides={"user_idx": pl.Int32, "example_id": pl.Int64},
    )


def test_subset_and_overall_arithmetic() -> None:
    # 10 users, 4 of whose true items are among the candidates (retriever ranks 1, 2, 5, 9)
    retriever = [1, 2, 5, 9, 30, 40, 50, 60, 70, 80]
    candidates = candidates_frame([r <= 20 for r in retriever], retriever)
    rankings = pl.DataFrame(
        {"example_id": [100, 101, 102, 103], "target_rank": [3, 1, 1, 2]},
        schema_overrides={"example_id": pl.Int64},
    )
    ranks = pl.concat([retriever_ranks(candidates), llm_ranks(candidates, rankings, "lkg_rag")])
    ev = evaluate(ranks, EvaluationConfig(n_bootstrap=50, n_permutations=50))

    def value(ranker: str, population: str, metric: str) -> float:
        rows = ev.metrics.filter(
            (pl.col("ranker") == ranker)
            & (pl.col("population") == population)
            & (pl.col("metric") == metric)
        )
        return rows["value"].item()

    subset_mrr5 = (1 / 3 + 1 + 1 + 1 / 2) / 4
    assert value("lkg_rag", "subset", "MRR@5") == pytest.approx(subset_mrr5)
    # overall: the same hits over all 10 users; the 6 outside the candidates are misses
    assert value("lkg_rag", "overall", "MRR@5") == pytest.approx(subset_mrr5 * 4 / 10)
    assert value("retriever", "subset", "Recall@5") == pytest.approx(3 / 4)
    assert value("retriever", "overall", "Recall@5") == pytest.approx(3 / 10)
    assert value("retriever", "overall", "MRR@10") == pytest.approx(
        (1 + 1 / 2 + 1 / 5 + 1 / 9) / 10
    )
    populations = {(r["population"]): r["n_users"] for r in ev.populations.to_dicts()}
    assert populations == {"subset": 4, "overall": 10}
    compared = ev.comparisons.filter(
        (pl.col("ranker") == "lkg_rag") & (pl.col("metric") == "MRR@5")
    )
    assert compared["baseline"].to_list() == ["retriever", "retriever"]  # no llamarec ranked
    overall = compared.filter(pl.col("population") == "overall").row(0, named=True)
    assert overall["difference"] == pytest.approx(subset_mrr5 * 0.4 - (1 + 1 / 2 + 1 / 5) / 10)
    assert ev.verdicts[0].startswith("lkg_rag does NOT significantly beat retriever (test, ")
    assert "(test, overall, 10 users): MRR@1 " in ev.verdicts[0]  # 10 users prove nothing


def test_unranked_subset_examples_are_an_error_and_unranked_splits_are_skipped() -> None:
    candidates = pl.concat(
        [
            candidates_frame([True, True], [1, 2]),
            candidates_frame([True, False], [3, 40]).with_columns(
                split=pl.lit("val"), example_id=pl.col("example_id") + 10
            ),
        ]
    )
    only_one = pl.DataFrame({"example_id": [100], "target_rank": [1]})
    with pytest.raises(ValueError, match="1 test examples whose true item is a candidate"):
        llm_ranks(candidates, only_one, "kg_rag")
    test_only = pl.DataFrame({"example_id": [100, 101], "target_rank": [2, None]})
    ranks = llm_ranks(candidates, test_only, "kg_rag")
    assert ranks["split"].unique().to_list() == ["test"]  # val was not ranked: left out
    assert ranks["rank"].to_list() == [2.0, math.inf]  # a null rank: the LLM missed it


def test_bootstrap_intervals_cover_the_true_mean() -> None:
    rng = np.random.default_rng(0)
    p, covered, reps = 0.3, 0, 200
    for _ in range(reps):
        sample = (rng.random((300, 1)) < p).astype(float)  # (U, 1) per-user hits
        low, high = bootstrap_intervals(sample, 400, 0.95, rng)
        covered += int(low[0] <= p <= high[0])
    assert 0.89 <= covered / reps <= 0.99, covered / reps


def test_bootstrap_in_blocks_is_the_bootstrap_of_one_draw() -> None:
    """50,000 users: the resamples come in blocks, with the intervals of one (B, U) draw."""
    values = np.random.default_rng(4).random((50_000, 2))
    picks = np.random.default_rng(9).integers(0, 50_000, size=(100, 50_000))
    means = np.stack([values[row].mean(axis=0) for row in picks])  # (B, M), one draw
    low, high = bootstrap_intervals(values, 100, 0.9, np.random.default_rng(9))
    np.testing.assert_allclose(low, np.percentile(means, 5, axis=0), rtol=1e-12)
    np.testing.assert_allclose(high, np.percentile(means, 95, axis=0), rtol=1e-12)


def test_paired_randomization_test_has_its_level_and_power() -> None:
    rng = np.random.default_rng(1)
    same = rng.random((200, 2))
    assert paired_randomization_test(same, same, 500, rng) == pytest.approx([1.0, 1.0])
    better = same + 0.2
    assert (paired_randomization_test(better, same, 500, rng) < 0.01).all()
    rejections = 0
    for _ in range(200):
        a, b = rng.random((100, 1)), rng.random((100, 1))  # no difference in truth
        rejections += int(paired_randomization_test(a, b, 300, rng)[0] < 0.05)
    assert 0.01 <= rejections / 200 <= 0.11, rejections


def test_report_is_deterministic_json_and_markdown() -> None:
    rng = np.random.default_rng(2)
    retriever = rng.integers(1, 60, 80).tolist()
    candidates = candidates_frame([r <= 20 for r in retriever], retriever)
    subset = candidates.filter("in_candidates")
    rankings = {
        v: subset.select("example_id", target_rank=pl.lit(rng.integers(1, 21, subset.height)))
        for v in ("llamarec", "lkg_rag")
    }
    parts = [retriever_ranks(candidates)]
    parts += [llm_ranks(candidates, r, v) for v, r in rankings.items()]
    config = EvaluationConfig(n_bootstrap=100, n_permutations=200, seed=5)
    first, second = evaluate(pl.concat(parts), config), evaluate(pl.concat(parts), config)
    assert first.metrics.equals(second.metrics) and first.comparisons.equals(second.comparisons)
    pairs = set(first.comparisons.select("ranker", "baseline").unique().iter_rows())
    assert pairs == {
        ("llamarec", "retriever"),
        ("lkg_rag", "llamarec"),
        ("lkg_rag", "retriever"),
    }
    # A ranker's figures are its own: leaving another ranker out of the report moves none of
    # them (one stream drawn in turn by every ranker did).
    alone = evaluate(pl.concat([parts[0], parts[2]]), config)
    mine = (pl.col("ranker") == "lkg_rag") & (pl.col("baseline") != "llamarec")
    assert alone.metrics.equals(first.metrics.filter(pl.col("ranker") != "llamarec"))
    assert alone.comparisons.equals(first.comparisons.filter(mine))
    report = report_dict(first, {"dataset": "toy", "latency": [{"variant": "x", "mean_s": 0.1}]})
    parsed = json.loads(dumps(report))
    assert parsed["verdicts"] == first.verdicts and len(parsed["metrics"]) == first.metrics.height
    markdown = report_markdown(report, first)
    assert "## test, overall (80 users; 95% bootstrap intervals)" in markdown
    assert "| lkg_rag |" in markdown and "Latency per user" in markdown
    assert json.loads(dumps({"x": float("nan")})) == {"x": None}


def _comparisons(rows: list[tuple[str, str, float, float]]) -> pl.DataFrame:
    """(ranker, metric, difference, p_value) on test overall, 100 users, against the retriever."""
    return pl.DataFrame(
        [
            {
                "ranker": ranker,
                "baseline": "retriever",
                "split": "test",
                "population": "overall",
                "metric": metric,
                "value": 0.1 + difference,
                "baseline_value": 0.1,
                "difference": difference,
                "relative": difference / 0.1,
                "p_value": p,
                "n_users": 100,
            }
            for ranker, metric, difference, p in rows
        ]
    )


def test_verdicts_say_plainly_who_won() -> None:
    lines = verdicts(
        _comparisons(
            [
                ("a", "MRR@1", 0.02, 0.01),
                ("a", "NDCG@10", 0.01, 0.03),
                ("b", "MRR@1", 0.02, 0.01),
                ("b", "NDCG@10", 0.01, 0.30),
                ("c", "MRR@1", -0.02, 0.01),
                ("c", "NDCG@10", -0.01, 0.20),
                ("d", "MRR@1", 0.02, 0.01),
                ("d", "NDCG@10", -0.02, 0.01),
                # better at p < 0.05 on one, worse without significance on the other
                ("e", "MRR@1", 0.05, 0.01),
                ("e", "NDCG@10", -0.001, 0.80),
                ("f", "MRR@1", -0.001, 0.60),  # and the other way round
                ("f", "NDCG@10", 0.01, 0.01),
            ]
        )
    )
    assert [line.split(" (test")[0] for line in lines] == [
        "a BEATS retriever",
        "b does NOT significantly beat retriever",
        "c is WORSE than retriever",
        "d is MIXED against retriever",
        "e does NOT significantly beat retriever",
        "f does NOT significantly beat retriever",
    ]
    assert lines[0].endswith("MRR@1 +20.0% (p = 0.01), NDCG@10 +10.0% (p = 0.03)")


@pytest.mark.parametrize(
    ("ks", "says"),
    [((1, 10, 50), r"ks must be in 1\.\.20"), ((5, 20), "ks must include 1 and 10"), ((), "1..20")],
)
def test_cutoffs_the_comparison_cannot_use_are_refused(ks: tuple[int, ...], says: str) -> None:
    """k > 20 made every reranker lose to the retriever by construction; without 1 and 10 the
    verdicts and the served-ranker choice had nothing to read."""
    with pytest.raises(ValueError, match=says):
        EvaluationConfig(ks=ks)


def test_fused_rankers_are_compared_with_their_own_scores_and_the_fused_reference() -> None:
    assert _baselines("lkg_rag+prior") == ["llamarec+prior", "retriever", "lkg_rag"]
    assert _baselines("llamarec+prior") == ["retriever", "llamarec"]
    assert _baselines("kg_rag") == ["llamarec", "retriever"]
    assert _baselines("retriever") == []
