import math

import numpy as np
import pytest
import torch

from lkg_pipeline.core.evaluate.metrics import NOT_RANKED, rank_of_target, ranking_metrics


def test_ranking_metrics_match_hand_computed_values() -> None:
    ranks = np.array([1, 3, 11, NOT_RANKED])
    m = ranking_metrics(ranks, ks=(1, 5, 10, 20))
    assert m["Recall@1"] == pytest.approx(0.25)
    assert m["MRR@1"] == pytest.approx(0.25)
    assert m["NDCG@1"] == pytest.approx(0.25)
    assert m["Recall@5"] == pytest.approx(0.5)
    assert m["MRR@5"] == pytest.approx((1 + 1 / 3) / 4)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / 2) / 4)  # log2(3 + 1) = 2
    assert m["Recall@10"] == pytest.approx(0.5)  # 11 > 10
    assert m["Recall@20"] == pytest.approx(0.75)
    assert m["MRR@20"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 4)
    assert m["NDCG@20"] == pytest.approx((1 + 1 / 2 + 1 / math.log2(12)) / 4)
    assert set(m) == {f"{name}@{k}" for name in ("MRR", "NDCG", "Recall") for k in (1, 5, 10, 20)}


def test_ranking_metrics_reject_zero_based_ranks() -> None:
    with pytest.raises(AssertionError, match="1-based"):
        ranking_metrics(np.array([0, 1]))


def test_rank_of_target_tie_breaks() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2], [1.0, float("-inf"), 0.0, float("-inf")]])
    # Row 0: item 2 ties with item 1; row 1: target 3 is masked (-inf) and ties with item 1.
    target = torch.tensor([2, 3])
    assert rank_of_target(scores, target).tolist() == [1, 3]  # 1 + #strictly greater
    assert rank_of_target(scores, target, tie_break="index").tolist() == [2, 4]
    assert rank_of_target(scores, torch.tensor([0, 0])).tolist() == [4, 1]


def test_rank_of_target_index_matches_stable_sort() -> None:
    scores = torch.randint(0, 4, (50, 30)).float()  # many ties
    target = torch.randint(0, 30, (50,))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    expected = (order == target[:, None]).float().argmax(dim=1) + 1
    assert torch.equal(rank_of_target(scores, target, tie_break="index"), expected)


def test_rank_of_target_unknown_tie_break() -> None:
    with pytest.raises(ValueError, match="optimistic"):
        rank_of_target(torch.zeros(1, 3), torch.tensor([0]), tie_break="random")  # type: ignore[arg-type]
