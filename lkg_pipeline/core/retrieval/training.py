"""Training the retriever (LRURec or SASRec) on users' train sequences, with the best validation
epoch kept; then its progress lines, its report against popularity, and its folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lkg_pipeline.core.retrieval.device import model_device
from lkg_pipeline.core.retrieval.ranking import evaluate_model, popularity_report, retriever_report
from lkg_pipeline.core.retrieval.seqrec import (
    RetrieverConfig,
    SequentialRecommender,
    build_retriever,
    left_pad,
    save_retriever,
)
from lkg_pipeline.core.retrieval.sequences import UserSequences


@dataclass
class TrainResult:
    model: SequentialRecommender  # best validation state, in eval mode
    config: RetrieverConfig
    history: list[dict[str, float]]  # one dict per epoch, as passed to on_log
    best_epoch: int
    best_val: dict[str, float]  # validation metrics of the best epoch
    wall_time_s: float
    n_steps: int = field(default=0)


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

        if not math.isfinite(loss_sum):
            # NaN scores rank every target first (no score is above NaN): validation would
            # call a diverged model perfect and keep it.
            raise FloatingPointError(
                f"retriever training diverged in epoch {epoch} (loss {loss_sum / n_targets}); "
                f"lower lr (now {config.lr}) or keep grad_clip (now {config.grad_clip})"
            )
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


PROGRESS_FIELDS = ("epoch", "step", "loss", "val_Recall@10", "val_NDCG@10", "best")


def progress(record: dict) -> dict:
    """An epoch's record cut to what a person follows, floats to 4 places: a readable log line."""
    return {
        k: round(v, 4) if isinstance(v, float) else v
        for k, v in record.items()
        if k in PROGRESS_FIELDS
    }


def report_with_popularity(
    result: TrainResult, data: UserSequences, name: str, ks: Sequence[int], k: int = 20
) -> dict:
    """The retriever's val/test metrics beside popularity's: a retriever must beat the baseline."""
    return {
        name: retriever_report(result.model, data, ks, k),
        "popularity": popularity_report(data, ks, k),
    }


def save_trained(
    result: TrainResult,
    config: RetrieverConfig,
    dataset: str,
    code_version: str,
    report: dict,
    folder: Path,
) -> None:
    """Model and training record in one folder, so that they are replaced together."""
    save_retriever(result.model, config, folder)
    (folder / "training.json").write_text(
        json.dumps(
            {
                "dataset": dataset,
                "config": dataclasses.asdict(config),
                "code_version": code_version,
                "best_epoch": result.best_epoch,
                "wall_time_s": result.wall_time_s,
                "history": result.history,
                "metrics": report,
            },
            indent=2,
        )
    )
