"""The retriever's top-k candidates for the LLM ranker: for val/test, and for training prompts
(by the retriever on earlier prefixes, or at random), in the table the later stages read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import polars as pl
import torch

from lkg_pipeline.core.evaluate.metrics import rank_of_target
from lkg_pipeline.core.retrieval.device import model_device
from lkg_pipeline.core.retrieval.ranking import mask_history, rank_users, top_k
from lkg_pipeline.core.retrieval.seqrec import RetrieverConfig, SequentialRecommender, left_pad
from lkg_pipeline.core.retrieval.sequences import UserSequences
from lkg_pipeline.core.retrieval.training import train_retriever

CandidatePolicy = Literal["random", "retriever"]


@dataclass(frozen=True)
class Candidates:
    top_k: pl.DataFrame  # user_idx, split, rank (1..k), item_idx, score
    targets: pl.DataFrame  # user_idx, split, target_item_idx, target_rank, in_candidates


def retrieve_candidates(
    model: SequentialRecommender, data: UserSequences, k: int = 20, batch_size: int = 256
) -> Candidates:
    """Top-k new items per user for val and test, and where each true item ranks overall."""
    tops, targets = [], []
    users = np.arange(data.n_users, dtype=np.int32)
    for split in ("val", "test"):
        inputs, target = data.inputs(split)
        ranked = rank_users(model, inputs, k, target, batch_size)
        values, items, ranks = ranked.values, ranked.items, ranked.target_ranks
        assert ranks is not None
        tops.append(
            pl.DataFrame(
                {
                    "user_idx": np.repeat(users, k),
                    "split": [split] * (len(users) * k),
                    "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(users)),
                    "item_idx": items.numpy().reshape(-1).astype(np.int32),
                    "score": values.numpy().reshape(-1).astype(np.float32),
                }
            )
        )
        targets.append(
            pl.DataFrame(
                {
                    "user_idx": users,
                    "split": [split] * len(users),
                    "target_item_idx": target.astype(np.int32),
                    "target_rank": ranks.astype(np.int64),
                    "in_candidates": ranks <= k,
                }
            )
        )
    return Candidates(top_k=pl.concat(tops), targets=pl.concat(targets))


@torch.no_grad()
def _prefix_scores(
    model: SequentialRecommender,
    train: list[list[int]],
    users: np.ndarray,
    prefix_lens: np.ndarray,
    batch_size: int,
) -> torch.Tensor:
    """(N, I) scores after train[u][:p] for each (u, p), history masked; equals score_users.

    The model is causal, so one pass over a user's first max_len items yields every prefix
    up to max_len at once; only longer prefixes need their own truncated window.
    """
    max_len = model.config.max_len
    jobs: list[tuple[list[int], list[int], list[int]]] = []  # (window, positions, rows)
    for u in np.unique(users):
        rows = np.flatnonzero(users == u)
        short = rows[prefix_lens[rows] <= max_len]
        if len(short):
            end = int(prefix_lens[short].max())
            jobs.append((train[u][:end], (prefix_lens[short] - 1).tolist(), short.tolist()))
        for r in rows[prefix_lens[rows] > max_len]:
            p = int(prefix_lens[r])
            jobs.append((train[u][p - max_len : p], [max_len - 1], [int(r)]))
    was_training = model.training
    model.eval()
    device = model_device(model)
    hidden = torch.empty((len(users), model.config.d_model), device=device)  # (N, d)
    jobs.sort(key=lambda j: len(j[0]))
    with torch.no_grad():
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i : i + batch_size]
            x = left_pad([j[0] for j in chunk], max_len).to(device)  # (b, L)
            h = model.encode(x)  # (b, L, d)
            for b, (window, positions, rows) in enumerate(chunk):
                hidden[rows] = h[b, x.shape[1] - len(window) + np.asarray(positions)]
        scores = model.item_scores(hidden)  # (N, I)
    model.train(was_training)
    return mask_history(scores, [train[u][:p] for u, p in zip(users, prefix_lens, strict=True)])


def _train_prefixes(
    train: list[list[int]], examples_per_user: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, prefix_len, target) of the last `examples_per_user` prefixes of each user."""
    if examples_per_user is not None and examples_per_user < 1:
        raise ValueError(f"examples_per_user={examples_per_user} must be ≥ 1")
    users, prefix_lens = [], []
    for u, seq in enumerate(train):
        first = 1 if examples_per_user is None else max(1, len(seq) - examples_per_user)
        prefix_lens.append(np.arange(first, len(seq)))
        users.append(np.full(len(prefix_lens[-1]), u))
    user_arr, len_arr = np.concatenate(users), np.concatenate(prefix_lens)
    if len(user_arr) == 0:
        raise ValueError("no user has >= 2 train items: no training examples")
    targets = np.array([train[u][p] for u, p in zip(user_arr, len_arr, strict=True)])
    return user_arr, len_arr, targets.astype(np.int64)


def training_candidates(
    data: UserSequences,
    policy: CandidatePolicy,
    model: SequentialRecommender | None = None,
    n_candidates: int = 20,
    examples_per_user: int | None = None,
    seed: int = 0,
    batch_size: int = 4096,
) -> pl.DataFrame:
    """Ranker training examples from train prefixes only (val/test never leak into training).

    Each row: the first `prefix_len` train items are the history, train[prefix_len] is the
    target, and `candidate_item_idxs` holds n_candidates distinct items with the target
    exactly once, in seeded random order (the ranker must not learn a position), with
    `candidate_scores` (the retriever's score of each, same order) and `target_rank` (the
    target's full-ranking rank) under the retriever policy, null under the random one.
      - "random": target + uniform negatives the user never interacted with in train (its
        whole train sequence, so later positives are never negatives; val/test items are
        allowed, being unknown at training time).
      - "retriever": the model's top items for that prefix (prefix masked), the target
        replacing the last one when the retriever missed it: ranker inputs look like test.
    examples_per_user: the last k prefixes per user; None = every prefix of length >= 1.
    """
    if policy not in get_args(CandidatePolicy):
        raise ValueError(f"unknown policy {policy!r}; choose one of {get_args(CandidatePolicy)}")
    assert 2 <= n_candidates <= data.n_items, f"need 2 <= n_candidates <= {data.n_items}"
    rng = np.random.default_rng(seed)
    users, prefix_lens, targets = _train_prefixes(data.train, examples_per_user)

    scores_of = None  # (N, n_candidates) retriever scores of the candidates (retriever policy)
    target_ranks = None  # (N,) the target's full-ranking retriever rank (retriever policy)
    if policy == "random":
        cands = np.empty((len(users), n_candidates), dtype=np.int64)
        cands[:, 0] = targets
        all_items = np.arange(data.n_items)
        for u in np.unique(users):
            rows = np.flatnonzero(users == u)
            pool = np.setdiff1d(all_items, data.train[u])  # never-seen items
            assert len(pool) >= n_candidates - 1, f"user {u} has seen too many items"
            keys = rng.random((len(rows), len(pool)))  # uniform subset via random keys
            pick = np.argpartition(keys, n_candidates - 2, axis=1)[:, : n_candidates - 1]
            cands[rows, 1:] = pool[pick]
    else:
        assert model is not None, "policy 'retriever' needs a model"
        cands = np.empty((len(users), n_candidates), dtype=np.int64)
        scores_of = np.empty((len(users), n_candidates), dtype=np.float32)
        target_ranks = np.empty(len(users), dtype=np.int64)
        for i in range(0, len(users), batch_size):
            sl = slice(i, i + batch_size)
            scores = _prefix_scores(model, data.train, users[sl], prefix_lens[sl], 256)
            cands[sl] = top_k(scores, n_candidates)[1].cpu().numpy()
            target = torch.as_tensor(targets[sl])
            target_ranks[sl] = rank_of_target(scores, target, tie_break="index").cpu().numpy()
            missed = ~(cands[sl] == targets[sl, None]).any(axis=1)
            cands[sl][missed, -1] = targets[sl][missed]
            chosen = torch.from_numpy(cands[sl]).to(scores.device)
            scores_of[sl] = scores.gather(1, chosen).cpu().numpy()
    # One seeded permutation per row, applied to the items and their scores alike (the draws
    # depend on the shape only: the same order `rng.permuted(cands, axis=1)` gives).
    order = rng.permuted(np.broadcast_to(np.arange(n_candidates), cands.shape).copy(), axis=1)
    cands = np.take_along_axis(cands, order, axis=1)
    return pl.DataFrame(
        {
            "user_idx": users.astype(np.int32),
            "prefix_len": prefix_lens.astype(np.int32),
            "target_item_idx": targets.astype(np.int32),
            "candidate_item_idxs": pl.Series(cands.astype(np.int32)).cast(pl.List(pl.Int32)),
            "candidate_scores": pl.Series(
                [None] * len(users)
                if scores_of is None
                else list(np.take_along_axis(scores_of, order, axis=1)),
                dtype=pl.List(pl.Float32),
            ),
            "target_rank": pl.Series(
                [None] * len(users) if target_ranks is None else target_ranks, dtype=pl.Int64
            ),
        }
    )


def held_out_training_candidates(
    data: UserSequences,
    config: RetrieverConfig,
    n_candidates: int = 20,
    examples_per_user: int = 1,
    seed: int = 0,
    retrieved_only: bool = False,
    on_log: Callable[[dict[str, float]], None] | None = None,
    device: str = "cpu",
) -> pl.DataFrame:
    """Training examples scored the way val is: by a retriever that never trained on them.

    The shared retriever was fitted on every train prefix, so on its own train prefixes it is
    sharper than on val (ml-100k, SASRec: recall@20 0.54 vs 0.35), and a ranker trained over its
    scores learns to trust them more than val deserves. Here the example whose target is the
    s-th last train item is scored by a retriever trained (same config, early-stopped on that
    very item, as the shared one is on val) on the sequences cut before it: the leave-one-out
    protocol one step back in time. One retriever per prefix, so `examples_per_user` costs
    that many retriever trainings. retrieved_only: keep the examples whose target the
    retriever ranked in its top n_candidates (instead of putting it in), so training
    examples look like the scored val/test subset.
    Same columns and order as `training_candidates`.
    """
    if examples_per_user < 1:
        raise ValueError(f"examples_per_user={examples_per_user} must be ≥ 1")
    frames = []
    for shift in range(1, examples_per_user + 1):
        # users with a target at this shift and >= 1 item before it
        users = [u for u, seq in enumerate(data.train) if len(seq) >= shift + 1]
        if not users:
            break
        cut = [data.train[u][: len(data.train[u]) - shift] for u in users]
        after = [
            data.train[u][len(data.train[u]) - shift + 1] if shift >= 2 else int(data.val[u])
            for u in users
        ]
        earlier = UserSequences(
            train=cut,
            val=np.array([data.train[u][-shift] for u in users]),
            test=np.array(after),
            n_items=data.n_items,
        )
        model = train_retriever(earlier, config, on_log=on_log, device=device).model
        # every user's train sequence ending at this shift's target: its last prefix is it
        upto = UserSequences(
            train=[seq[: max(len(seq) - shift + 1, 0)] for seq in data.train],
            val=data.val,
            test=data.test,
            n_items=data.n_items,
        )
        frames.append(
            training_candidates(
                upto, "retriever", model, n_candidates, examples_per_user=1, seed=seed + shift - 1
            )
        )
    if not frames:
        raise ValueError("no user has >= 2 train items: no training examples")
    table = pl.concat(frames).sort("user_idx", "prefix_len")
    if retrieved_only:
        table = table.filter(pl.col("target_rank") <= n_candidates)
    return table


CANDIDATE_SCHEMA = {  # (`candidate_table` puts an `example_id` row key in front)
    "user_idx": pl.Int32,
    "split": pl.String,
    "prefix_len": pl.Int32,  # how many of the user's items (in order) form the input history
    "target_item_idx": pl.Int32,
    "candidate_item_idxs": pl.List(pl.Int32),
    # retriever scores in candidate order (train: under the retriever policy; else null)
    "candidate_scores": pl.List(pl.Float32),
    # the target's full-ranking retriever rank (train: before the target was put in)
    "target_rank": pl.Int64,
    "in_candidates": pl.Boolean,
}


def candidate_table(
    candidates: Candidates, train_examples: pl.DataFrame, data: UserSequences
) -> pl.DataFrame:
    """One row per ranker example, train / val / test, in the shape prompts are built from.

    Val/test candidates stay in retriever order (rank 1 first); train candidates keep the
    seeded shuffle of `training_candidates`.
    """
    ranked = (
        candidates.top_k.sort("user_idx", "split", "rank")
        .group_by("user_idx", "split", maintain_order=True)
        .agg(candidate_item_idxs=pl.col("item_idx"), candidate_scores=pl.col("score"))
    )
    train_len = pl.DataFrame(
        {"user_idx": np.arange(data.n_users), "n_train": [len(s) for s in data.train]},
        schema={"user_idx": pl.Int32, "n_train": pl.Int32},
    )
    evaluated = (
        candidates.targets.join(ranked, on=["user_idx", "split"])
        .join(train_len, on="user_idx")
        .with_columns(prefix_len=pl.col("n_train") + (pl.col("split") == "test").cast(pl.Int32))
    )
    training = train_examples.with_columns(split=pl.lit("train"), in_candidates=pl.lit(True))
    for name in ("candidate_scores", "target_rank"):  # older callers' frames lack them
        if name not in training.columns:
            training = training.with_columns(pl.lit(None, CANDIDATE_SCHEMA[name]).alias(name))
    columns = [pl.col(name).cast(dtype) for name, dtype in CANDIDATE_SCHEMA.items()]
    order = pl.col("split").replace_strict({"train": 0, "val": 1, "test": 2}, return_dtype=pl.Int8)
    return (
        pl.concat([training.select(columns), evaluated.select(columns)])
        .sort(order, "user_idx", "prefix_len")
        .with_row_index("example_id")  # stable: later stages key prompts and paths by it
        .with_columns(pl.col("example_id").cast(pl.Int64))
    )
