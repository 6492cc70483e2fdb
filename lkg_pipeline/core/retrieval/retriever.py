"""Train the retriever (LRURec or SASRec), score users, and emit candidates for the LLM ranker.

Inputs are plain frames and lists, outputs are polars frames: the Dagster layer only loads,
calls and writes. All item ids here are the external dense 0-based `item_idx`.

Leave-one-out protocol: the model trains on each user's train sequence; validation input =
train sequence (target = val item), test input = train + val item (target = test item).
Items in the input are masked out of the ranking (-inf), as the candidates must be new items.
Ranks break score ties by lower item index (`tie_break="index"`), so a target's rank is
exactly its position in the emitted top-k list and coverage equals Recall@k.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import polars as pl
import torch
from torch.nn import functional as F

from lkg_pipeline.core.evaluate.metrics import DEFAULT_KS, rank_of_target, ranking_metrics
from lkg_pipeline.core.retrieval.seqrec import (
    RetrieverConfig,
    SequentialRecommender,
    build_retriever,
    left_pad,
)

SPLITS = ("train", "val", "test")
DEVICES = ("auto", "cpu", "cuda")
EvalSplit = Literal["val", "test"]
CandidatePolicy = Literal["random", "retriever"]


@dataclass(frozen=True)
class UserSequences:
    """Per-user leave-one-out sequences; list index = user_idx."""

    train: list[list[int]]  # item_idx in position order, >= 1 per user
    val: np.ndarray  # (U,) the val item of each user
    test: np.ndarray  # (U,) the test item of each user
    n_items: int

    @property
    def n_users(self) -> int:
        return len(self.train)

    def inputs(self, split: EvalSplit) -> tuple[list[list[int]], np.ndarray]:
        """(input sequences, target items) for evaluating `split`."""
        if split == "val":
            return self.train, self.val
        if split == "test":
            return [s + [int(v)] for s, v in zip(self.train, self.val, strict=True)], self.test
        raise ValueError(f"unknown split {split!r}; choose 'val' or 'test'")


def user_sequences(sequences: pl.DataFrame, n_items: int | None = None) -> UserSequences:
    """Validate the `sequences` contract and group it per user.

    Fails loudly instead of silently evaluating on a malformed split: each user needs >= 1
    train row and exactly one val and one test row at the last two positions.
    """
    need = {"user_idx", "item_idx", "position", "split"}
    missing = need - set(sequences.columns)
    assert not missing, f"sequences lacks columns {sorted(missing)}"
    bad = set(sequences["split"].unique().to_list()) - set(SPLITS)
    assert not bad, f"unknown split values {sorted(bad)}; expected {SPLITS}"
    split = pl.col("split")
    per_user = (
        sequences.sort("user_idx", "position")
        .group_by("user_idx", maintain_order=True)
        .agg(
            n=pl.len(),
            first_pos=pl.col("position").min(),
            last_pos=pl.col("position").max(),
            n_unique_pos=pl.col("position").n_unique(),
            last=split.last(),
            second_last=split.slice(-2, 1).first(),
            n_val=(split == "val").sum(),
            n_test=(split == "test").sum(),
            train=pl.col("item_idx").filter(split == "train"),
            val=pl.col("item_idx").filter(split == "val").first(),
            test=pl.col("item_idx").filter(split == "test").first(),
        )
    )
    u = per_user["user_idx"].to_numpy()
    assert (u == np.arange(len(u))).all(), "user_idx must be dense 0..U-1"
    n = per_user["n"].to_numpy()
    assert (per_user["n_val"].to_numpy() == 1).all(), "every user needs exactly one val row"
    assert (per_user["n_test"].to_numpy() == 1).all(), "every user needs exactly one test row"
    assert (n >= 3).all(), "every user needs >= 1 train row plus val and test"
    ok_pos = (per_user["first_pos"].to_numpy() == 0) & (per_user["last_pos"].to_numpy() == n - 1)
    ok_pos &= per_user["n_unique_pos"].to_numpy() == n
    assert ok_pos.all(), "positions must be 0..n-1 per user without gaps or duplicates"
    assert (per_user["last"] == "test").all() and (per_user["second_last"] == "val").all(), (
        "val and test must be each user's last two positions"
    )
    max_item = int(sequences["item_idx"].max())
    n_items = max_item + 1 if n_items is None else n_items
    assert max_item < n_items and int(sequences["item_idx"].min()) >= 0, "item_idx out of range"
    return UserSequences(
        train=[list(map(int, s)) for s in per_user["train"].to_list()],
        val=per_user["val"].to_numpy().astype(np.int64),
        test=per_user["test"].to_numpy().astype(np.int64),
        n_items=n_items,
    )


@dataclass
class TrainResult:
    model: SequentialRecommender  # best validation state, in eval mode
    config: RetrieverConfig
    history: list[dict[str, float]]  # one dict per epoch, as passed to on_log
    best_epoch: int
    best_val: dict[str, float]  # validation metrics of the best epoch
    wall_time_s: float
    n_steps: int = field(default=0)


def resolve_device(requested: str) -> str:
    """ "auto": CUDA when present, else the CPU; "cuda" where there is none: a clear error."""
    if requested not in DEVICES:
        raise ValueError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device here")
    return requested


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def training_windows(train: list[list[int]], max_len: int, step: int) -> list[list[int]]:
    """Windows of <= max_len + 1 items (max_len inputs, as many next-item targets).

    The window ending at the last item always exists; longer sequences add earlier windows
    every `step` items, so with step == max_len every target is trained exactly once.
    """
    windows: list[list[int]] = []
    for seq in train:
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            windows.append(seq[start:end])
            if start == 0:
                break
            end -= step
    return windows


def bucketed_batches(
    lengths: np.ndarray, batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """Shuffled batches of similar lengths: sorting inside groups of 8 batches roughly halves
    the padding (hence the compute) while keeping the epoch order random."""
    order = torch.randperm(len(lengths), generator=generator).numpy()
    batches: list[list[int]] = []
    group = 8 * batch_size
    for g in range(0, len(order), group):
        chunk = order[g : g + group]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def _param_groups(model: SequentialRecommender, weight_decay: float) -> list[dict]:
    """Decay weight matrices and embeddings only: decaying biases, LayerNorm gains or the
    LRU log-parameters would pull them to arbitrary values rather than regularise."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.dim() < 2 or name.endswith("params_log")
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: SequentialRecommender, config: RetrieverConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)


def train_step(
    model: SequentialRecommender,
    optimizer: torch.optim.Optimizer,
    windows: list[list[int]],
    config: RetrieverConfig,
    generator: torch.Generator | None = None,
) -> tuple[float, int]:
    """One AdamW step of next-item cross-entropy on a batch of windows: (mean loss, number
    of targets). With the full softmax every position is projected onto the whole catalogue,
    the stage's cost that grows with the number of items; `sampled_negatives` projects onto
    the target and that many shared uniform negatives instead (`generator` draws them)."""
    batch = left_pad(windows, config.max_len + 1).to(model_device(model))  # (B, L+1)
    inp, tgt = batch[:, :-1], batch[:, 1:]  # (B, L) each
    mask = inp > 0  # (B, L): a real input always has a real next item
    hidden = model.encode(inp)[mask]  # (N, d)
    target = tgt[mask] - 1  # (N,) external item ids
    if config.sampled_negatives is None:
        loss = F.cross_entropy(model.item_scores(hidden), target)  # over (N, I)
    else:
        loss = _sampled_softmax_loss(model, hidden, target, config.sampled_negatives, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return loss.detach().item(), int(mask.sum())


def _sampled_softmax_loss(
    model: SequentialRecommender,
    hidden: torch.Tensor,
    target: torch.Tensor,
    n_negatives: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Cross-entropy over [target, negatives] with `n_negatives` uniform items shared by the
    batch; a negative that is a row's own target is masked out (an accidental hit). Uniform
    sampling makes the usual log-Q correction a constant, which cancels in the softmax."""
    n_items = model.config.n_items
    negatives = torch.randint(0, n_items, (n_negatives,), generator=generator)
    negatives = negatives.to(hidden.device)  # (S,)
    weight = model.item_emb.weight[1:]  # (I, d), external item j = row j
    positive = (hidden * weight[target]).sum(-1) + model.item_bias[target]  # (N,)
    sampled = hidden @ weight[negatives].T + model.item_bias[negatives]  # (N, S)
    sampled = sampled.masked_fill(negatives[None, :] == target[:, None], float("-inf"))
    logits = torch.cat([positive[:, None], sampled], dim=1)  # (N, 1 + S)
    return F.cross_entropy(logits, torch.zeros_like(target))


def train_retriever(
    data: UserSequences,
    config: RetrieverConfig,
    on_log: Callable[[dict[str, float]], None] | None = None,
    device: str = "cpu",
) -> TrainResult:
    """AdamW with full-softmax next-item loss; keep the epoch with the best `selection_metric`.

    `device`: where the model and its batches live (the model is returned there); the
    initial weights are drawn on the CPU whatever it is, so a CPU run is the reference."""
    assert config.n_items == data.n_items, f"config {config.n_items} vs data {data.n_items} items"
    started = time.perf_counter()
    torch.manual_seed(config.seed)  # init and dropout
    generator = torch.Generator().manual_seed(config.seed)  # batch order
    model = build_retriever(config).to(device)
    optimizer = make_optimizer(model, config)
    windows = training_windows(data.train, config.max_len, config.sliding_step or config.max_len)
    assert windows, "no user has >= 2 train items: nothing to train on"
    lengths = np.array([len(w) for w in windows])
    val_inputs, val_targets = data.inputs("val")

    history: list[dict[str, float]] = []
    best_key: tuple[float, float] | None = None
    best_state, best_epoch, best_val, stale, step = None, 0, {}, 0, 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        loss_sum, n_targets = 0.0, 0
        for idx in bucketed_batches(lengths, config.batch_size, generator):
            loss, n = train_step(model, optimizer, [windows[i] for i in idx], config, generator)
            step += 1
            loss_sum += loss * n
            n_targets += n

        val = evaluate_model(model, val_inputs, val_targets, batch_size=config.eval_batch_size)
        record = {"epoch": epoch, "step": step, "loss": loss_sum / n_targets}
        record |= {f"val_{k}": v for k, v in val.items()}
        tie_break = "NDCG@10" if config.selection_metric == "Recall@10" else "Recall@10"
        key = (val[config.selection_metric], val[tie_break])
        improved = best_key is None or key > best_key
        record["best"] = float(improved)
        history.append(record)
        if on_log is not None:
            on_log(record)
        if improved:
            best_key, best_epoch, best_val, stale = key, epoch, val, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                break

    assert best_state is not None, "max_epochs must be >= 1"
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        model=model,
        config=config,
        history=history,
        best_epoch=best_epoch,
        best_val=best_val,
        wall_time_s=time.perf_counter() - started,
        n_steps=step,
    )


def _mask_history(scores: torch.Tensor, histories: Sequence[Sequence[int]]) -> torch.Tensor:
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
            yield chunk, _mask_history(scores, batch)
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


def popularity_scores(data: UserSequences, inputs: list[list[int]]) -> torch.Tensor:
    """(U, I) train-interaction counts, history masked: the baseline any retriever must beat."""
    counts = np.bincount(np.concatenate(data.train), minlength=data.n_items).astype(np.float32)
    scores = torch.from_numpy(counts)[None, :].repeat(len(inputs), 1)  # (U, I)
    return _mask_history(scores, inputs)


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
    data: UserSequences, ks: Sequence[int] = DEFAULT_KS, k: int = 20
) -> dict[str, dict[str, float]]:
    """Same report as `retriever_report` for the popularity baseline (ties: lower index)."""
    return {
        split: evaluate_scores(popularity_scores(data, inputs), t, ks, k)
        for split in ("val", "test")
        for inputs, t in [data.inputs(split)]
    }


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
    return _mask_history(scores, [train[u][:p] for u, p in zip(users, prefix_lens, strict=True)])


def _train_prefixes(
    train: list[list[int]], examples_per_user: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, prefix_len, target) of the last `examples_per_user` prefixes of each user."""
    assert examples_per_user is None or examples_per_user >= 1, "examples_per_user >= 1"
    users, prefix_lens = [], []
    for u, seq in enumerate(train):
        first = 1 if examples_per_user is None else max(1, len(seq) - examples_per_user)
        prefix_lens.append(np.arange(first, len(seq)))
        users.append(np.full(len(prefix_lens[-1]), u))
    user_arr, len_arr = np.concatenate(users), np.concatenate(prefix_lens)
    assert len(user_arr) > 0, "no user has >= 2 train items: no training examples"
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
    sharper than on val (ml-100k: recall@20 0.44 vs 0.32), and a ranker trained over its
    scores learns to trust them more than val deserves. Here the example whose target is the
    s-th last train item is scored by a retriever trained (same config, early-stopped on that
    very item, as the shared one is on val) on the sequences cut before it: the leave-one-out
    protocol one step back in time. One retriever per prefix, so `examples_per_user` costs
    that many retriever trainings. retrieved_only: keep the examples whose target the
    retriever ranked in its top n_candidates (instead of putting it in), so training
    examples look like the scored val/test subset.
    Same columns and order as `training_candidates`.
    """
    assert examples_per_user >= 1, "examples_per_user >= 1"
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
    assert frames, "no user has >= 2 train items: no training examples"
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
