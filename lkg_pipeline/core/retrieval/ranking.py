"""Scoring users with the retriever (or by popularity), ranking the catalogue, and the metrics of
those ranks.

Items in the input are masked out of the ranking (-inf), as the candidates must be new items.
Ranks break score ties by lower item index (`tie_break="index"`), so a target's rank is
exactly its position in the emitted top-k list and coverage equals Recall@k.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lkg_pipeline.core.evaluate.metrics import DEFAULT_KS, rank_of_target, ranking_metrics
from lkg_pipeline.core.retrieval.device import model_device
from lkg_pipeline.core.retrieval.seqrec import SequentialRecommender, left_pad
from lkg_pipeline.core.retrieval.sequences import UserSequences


def mask_history(scores: torch.Tensor, histories: Sequence[Sequence[int]]) -> torch.Tensor:
    """Set each row's history items to -inf in place: candidates must be new items."""
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.fromiter((i for h in histories for i in h), dtype=np.int64, count=len(rows))
    at = scores.device
    scores[torch.from_numpy(rows).to(at), torch.from_numpy(cols).to(at)] = float("-inf")
    return scores


def _scored_batches(
    model: SequentialRecommender, inputs: list[list[int]], batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(rows of `inputs`, their (b, I) scores with input items at -inf), `batch_size` users at a
    time in order of length (similar lengths: less padding). Every whole-catalogue ranking goes
    through here so that no caller needs the (U, I) matrix: at 10× Beauty (224K users × 121K
    items) that matrix alone would be 108 GB."""
    assert all(len(s) > 0 for s in inputs), "every input sequence needs >= 1 item"
    was_training = model.training
    model.eval()
    device = model_device(model)
    order = np.argsort([len(s) for s in inputs], kind="stable")
    try:
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            batch = [inputs[j] for j in chunk]
            with torch.no_grad():
                scores = model(left_pad(batch, model.config.max_len).to(device))  # (b, I)
            yield chunk, mask_history(scores, batch)
    finally:
        model.train(was_training)


def score_users(
    model: SequentialRecommender, inputs: list[list[int]], batch_size: int = 256
) -> torch.Tensor:
    """(U, I) next-item scores for each input sequence, input items masked to -inf.

    Only the last max_len items feed the model, but every input item is masked. Holds the whole
    matrix: for small inputs and tests; the pipeline ranks with `rank_users`.
    """
    out = torch.empty((len(inputs), model.config.n_items))  # (U, I)
    for rows, scores in _scored_batches(model, inputs, batch_size):
        out[torch.from_numpy(rows)] = scores.cpu()
    return out


@dataclass(frozen=True)
class RankedUsers:
    values: torch.Tensor  # (U, k) the top-k scores, best first
    items: torch.Tensor  # (U, k) their item_idx
    target_ranks: np.ndarray | None  # (U,) full-ranking rank of each target (ties: lower index)


def rank_users(
    model: SequentialRecommender,
    inputs: list[list[int]],
    k: int,
    targets: np.ndarray | None = None,
    batch_size: int = 256,
) -> RankedUsers:
    """What `top_k` and `rank_of_target` give on `score_users`, with identical values, holding
    only `batch_size` users' scores at a time (memory: batch × items, not users × items)."""
    values = torch.empty((len(inputs), k))
    items = torch.empty((len(inputs), k), dtype=torch.long)
    ranks = None if targets is None else np.empty(len(inputs), dtype=np.int64)
    for rows, scores in _scored_batches(model, inputs, batch_size):
        index = torch.from_numpy(rows)
        top_values, top_items = top_k(scores, k)
        values[index], items[index] = top_values.cpu(), top_items.cpu()
        if ranks is not None:
            target = torch.as_tensor(targets[rows])
            ranks[rows] = rank_of_target(scores, target, tie_break="index").cpu().numpy()
    return RankedUsers(values, items, ranks)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (values, indices) per row, ties to the lower index (matches tie_break='index'):
    exactly the first k of a stable descending sort.

    By hand because a full stable sort costs O(I log I) per row, the bulk of ranking a large
    catalogue, and `torch.topk` orders ties arbitrarily. Its answer is the sort's wherever the
    top k + 1 values are distinct (no tie inside the top k, none across its boundary); the few
    rows with a tie are redone exactly (`_stable_top_k`).
    """
    assert k <= scores.shape[1], f"k={k} exceeds {scores.shape[1]} items"
    if k == 0:
        return scores[:, :0], torch.empty((scores.shape[0], 0), dtype=torch.long)
    extra = int(k < scores.shape[1])  # one more value shows a tie across the boundary
    values, indices = torch.topk(scores, k + extra, dim=1)  # (U, k+1), values descending
    kth = values[:, k - 1 : k]  # (U, 1)
    assert bool(torch.isfinite(kth).all()), f"a user has fewer than k={k} unseen items"
    redo = (values[:, 1:] == values[:, :-1]).any(dim=1).nonzero().view(-1)
    values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
    if len(redo):
        values[redo], indices[redo] = _stable_top_k(scores[redo], kth[redo], k)
    return values, indices


def _stable_top_k(
    scores: torch.Tensor, kth: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item above the k-th value, then the lowest-index items equal to it, ordered by
    (value descending, index ascending): O(I) per row instead of a full sort."""
    above = scores > kth  # (R, I)
    tied = scores == kth
    room = k - above.sum(dim=1, keepdim=True)  # (R, 1) places left for tied items
    chosen = above | (tied & (tied.cumsum(dim=1) <= room))  # exactly k per row
    indices = chosen.nonzero()[:, 1].view(-1, k)  # (R, k) ascending item index
    values = scores.gather(1, indices)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)  # ties: lower index
    return values, indices.gather(1, order)


def metrics_of_ranks(
    ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, k: int = 20
) -> dict[str, float]:
    """Full-ranking metrics plus coverage@k (target in the top k) from each user's rank."""
    out = ranking_metrics(ranks, ks)
    out[f"coverage@{k}"] = float(np.mean(ranks <= k))
    return out


def evaluate_scores(
    scores: torch.Tensor, targets: np.ndarray, ks: Sequence[int] = DEFAULT_KS, k: int = 20
) -> dict[str, float]:
    """Full-ranking metrics of masked (U, I) scores plus coverage@k (target in the top k)."""
    ranks = rank_of_target(scores, torch.as_tensor(targets), tie_break="index").numpy()
    return metrics_of_ranks(ranks, ks, k)


def evaluate_model(
    model: SequentialRecommender,
    inputs: list[list[int]],
    targets: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    k: int = 20,
    batch_size: int = 256,
) -> dict[str, float]:
    """`evaluate_scores` of the model's scores, computed `batch_size` users at a time."""
    ranks = rank_users(model, inputs, 0, targets, batch_size).target_ranks
    assert ranks is not None
    return metrics_of_ranks(ranks, ks, k)


def popularity_scores(data: UserSequences, inputs: list[list[int]]) -> torch.Tensor:
    """(U, I) train-interaction counts, history masked: the baseline any retriever must beat."""
    counts = np.bincount(np.concatenate(data.train), minlength=data.n_items).astype(np.float32)
    scores = torch.from_numpy(counts)[None, :].repeat(len(inputs), 1)  # (U, I)
    return mask_history(scores, inputs)


def retriever_report(
    model: SequentialRecommender, data: UserSequences, ks: Sequence[int] = DEFAULT_KS, k: int = 20
) -> dict[str, dict[str, float]]:
    """{"val": metrics, "test": metrics} with full ranking and coverage@k."""
    return {
        split: evaluate_model(model, inputs, t, ks, k, model.config.eval_batch_size)
        for split in ("val", "test")
        for inputs, t in [data.inputs(split)]
    }


def popularity_report(
    data: UserSequences, ks: Sequence[int] = DEFAULT_KS, k: int = 20, batch_size: int = 256
) -> dict[str, dict[str, float]]:
    """Same report as `retriever_report` for the popularity baseline (ties: lower index),
    ranked `batch_size` users at a time: one (U, I) matrix would be 2.7 GB at Beauty's size."""
    out = {}
    for split in ("val", "test"):
        inputs, targets = data.inputs(split)
        ranks = [
            rank_of_target(
                popularity_scores(data, inputs[i : i + batch_size]),
                torch.as_tensor(targets[i : i + batch_size]),
                tie_break="index",
            ).numpy()
            for i in range(0, len(inputs), batch_size)
        ]
        out[split] = metrics_of_ranks(np.concatenate(ranks), ks, k)
    return out
