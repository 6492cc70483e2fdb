"""The LRURec retriever as the catalogue grows: training and candidate retrieval, time and memory.

The retriever is the one dataset stage whose every step grows with the number of items: the
full-softmax loss projects each training position onto the whole catalogue, and retrieval
scores every item for every user. Three sizes, each measured in its own process:

- ml-100k (real): the data lake's sequences, max_len 200 (MovieLens);
- Beauty-sized (synthetic): 22,363 users, 12,101 items, ~8.9 items per user (the published
  5-core Amazon Beauty), max_len 50 (Amazon);
- 10× Beauty (synthetic): 223,630 users and 121,010 items, same shape.

Training: `train_step` (the step `train_retriever` runs) on `train_retriever`'s own batches, for a
time budget after one warm-up step; targets per second give one epoch's time (extrapolated
when the budget ends first). Retrieval, side by side on the same sample of users: ours,
`rank_users` (the scores of 256 users at a time, top-k without a full sort), and the way
`retrieve_candidates` worked before it: the whole (users × items) score matrix, a stable sort
of every row, then the target's rank. Both give identical candidates (checked); per-user time
extrapolates to all users, and the score matrix the old way would hold for all users is
computed (users × items × 4 bytes), not allocated.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from benchmarks.harness import (
    child_memory_limit_mb,
    current_rss_mb,
    lake_root,
    peak_rss_mb,
    require_lake,
    reset_peak_rss,
    run_isolated,
    table,
)
from benchmarks.paths.bench import SHAPES, _long_tail, synthetic_sequences
from lkg_pipeline.core.evaluate.metrics import rank_of_target
from lkg_pipeline.core.retrieval.lrurec import LRURec
from lkg_pipeline.core.retrieval.ranking import rank_users, score_users
from lkg_pipeline.core.retrieval.seqrec import RetrieverConfig
from lkg_pipeline.core.retrieval.sequences import user_sequences
from lkg_pipeline.core.retrieval.training import (
    bucketed_batches,
    make_optimizer,
    train_step,
    training_windows,
)


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    users: int  # 0: the real dataset's own
    items: int
    max_len: int


BEAUTY = SHAPES["beauty-like"]
SIZES = (
    Size("ml-100k (real)", 0, 0, 200),
    Size("Beauty-sized (synthetic)", 22_363, 12_101, 50),
    Size("10× Beauty (synthetic)", 223_630, 121_010, 50),
)
QUICK_SIZES = (
    Size("small (synthetic)", 300, 400, 50),
    Size("10× small (synthetic)", 3_000, 4_000, 50),
)
K = 20  # candidates per user, as the pipeline retrieves


def load_sequences(size: dict[str, Any]) -> tuple[Any, int]:
    """(UserSequences, n_items) of the real lake or of a seeded synthetic Beauty-shaped set."""
    if size["users"] == 0:
        frame = pl.read_parquet(require_lake("sequences").sequences)
        data = user_sequences(frame)
        return data, data.n_items
    rng = np.random.default_rng(0)
    shape = dataclasses.replace(BEAUTY, n_items=size["items"])
    frame = synthetic_sequences(shape, size["users"], _long_tail(shape.n_items, rng), rng)
    return user_sequences(frame, size["items"]), size["items"]


def old_retrieval(
    model: LRURec, inputs: list[list[int]], targets: np.ndarray
) -> tuple[torch.Tensor, np.ndarray]:
    """Before `rank_users`: the whole (U, I) score matrix, a stable sort per row, the rank."""
    scores = score_users(model, inputs, model.config.eval_batch_size)
    items = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :K]
    ranks = rank_of_target(scores, torch.as_tensor(targets), tie_break="index").numpy()
    return items, ranks


def measure_size(size: dict[str, Any], train_budget_s: float, sample_users: int) -> dict[str, Any]:
    """Child process: training throughput, then both retrievals on a sample of users."""
    tick = time.perf_counter()
    data, n_items = load_sequences(size)
    load_s = time.perf_counter() - tick
    config = RetrieverConfig(n_items=n_items, max_len=size["max_len"])
    torch.manual_seed(config.seed)
    model = LRURec(config)
    optimizer = make_optimizer(model, config)
    windows = training_windows(data.train, config.max_len, config.max_len)
    lengths = np.array([len(w) for w in windows])
    targets_per_epoch = int((lengths - 1).sum())
    batches = bucketed_batches(lengths, config.batch_size, torch.Generator().manual_seed(0))
    rss_before = current_rss_mb()
    phase_peaks = reset_peak_rss()  # each phase's own peak below, where Linux allows it

    model.train()
    train_step(model, optimizer, [windows[i] for i in batches[0]], config)  # warm-up
    steps, targets, start = 0, 0, time.perf_counter()
    for idx in batches[1:]:
        targets += train_step(model, optimizer, [windows[i] for i in idx], config)[1]
        steps += 1
        if time.perf_counter() - start > train_budget_s:
            break
    train_s = time.perf_counter() - start
    targets_per_s = targets / train_s
    train_peak = peak_rss_mb() if phase_peaks else None
    optimizer.zero_grad(set_to_none=True)

    model.eval()
    inputs, val = data.inputs("val")
    sample = np.random.default_rng(0).permutation(len(inputs))[:sample_users]
    sample_inputs, sample_targets = [inputs[i] for i in sample], val[sample]
    rank_users(model, sample_inputs[:256], K, sample_targets[:256])  # warm-up
    reset_peak_rss()
    tick = time.perf_counter()
    ours = rank_users(model, sample_inputs, K, sample_targets, config.eval_batch_size)
    ours_s = time.perf_counter() - tick
    ours_peak = peak_rss_mb() if phase_peaks else None
    reset_peak_rss()
    tick = time.perf_counter()
    old_items, old_ranks = old_retrieval(model, sample_inputs, sample_targets)
    old_s = time.perf_counter() - tick
    old_peak = peak_rss_mb() if phase_peaks else None
    assert ours.target_ranks is not None
    same = bool(torch.equal(ours.items, old_items) and (ours.target_ranks == old_ranks).all())
    n_users = data.n_users
    return {
        "users": n_users,
        "items": n_items,
        "interactions": sum(len(s) for s in data.train) + 2 * n_users,
        "max_len": config.max_len,
        "load_s": load_s,
        "rss_before_mb": rss_before,
        "train_steps": steps,
        "train_targets": targets,
        "targets_per_epoch": targets_per_epoch,
        "steps_per_epoch": len(batches),
        "train_s": train_s,
        "targets_per_s": targets_per_s,
        "epoch_s": targets_per_epoch / targets_per_s,
        "whole_epoch_timed": steps == len(batches) - 1,
        "sample_users": len(sample),
        "ours_s": ours_s,
        "old_s": old_s,
        "retrieval_speedup": old_s / ours_s,
        "same_candidates": same,
        # val and test: every user ranked twice by `retrieve_candidates`
        "ours_all_users_s": 2 * n_users * ours_s / len(sample),
        "old_all_users_s": 2 * n_users * old_s / len(sample),
        "train_peak_rss_mb": train_peak,
        "ours_peak_rss_mb": ours_peak,
        "old_sample_peak_rss_mb": old_peak,
        "old_score_matrix_gb": n_users * n_items * 4 / 1e9,
        "ours_score_batch_mb": config.eval_batch_size * n_items * 4 / 2**20,
    }


def run(quick: bool, out_dir: Path | None = None) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else SIZES
    if not quick:
        require_lake("sequences")  # the real size; checked before anything is timed
    train_budget_s, sample_users = (2.0, 200) if quick else (60.0, 2048)
    memory_limit_mb = child_memory_limit_mb()
    rows = []
    for size in sizes:
        kwargs = {
            "size": dataclasses.asdict(size),
            "train_budget_s": train_budget_s,
            "sample_users": sample_users,
        }
        print(f"  retriever: {size.name} …", flush=True)
        if quick:
            rows.append({"size": size.name, "status": "ok", "peak_rss_mb": None})
            rows[-1] |= measure_size(**kwargs)
            continue
        isolated = run_isolated(
            "benchmarks.retrieval.bench:measure_size",
            kwargs,
            timeout_s=20 * 60,
            memory_limit_mb=memory_limit_mb,
        )
        if not isolated.ok:
            rows.append({"size": size.name, "status": f"{isolated.status}: {isolated.error[:300]}"})
            print(f"    {rows[-1]['status']}", flush=True)
            continue
        row = {"size": size.name, "status": "ok", "peak_rss_mb": isolated.peak_rss_mb}
        rows.append(row | isolated.result)
        r = rows[-1]
        print(
            f"    epoch {r['epoch_s']:,.0f} s ({r['targets_per_s']:,.0f} targets/s); "
            f"retrieval ours {r['ours_all_users_s']:,.1f} s vs whole matrix "
            f"{r['old_all_users_s']:,.1f} s (×{r['retrieval_speedup']:.1f}); peak RSS "
            f"{isolated.peak_rss_mb:,.0f} MB",
            flush=True,
        )
    return {
        "rows": rows,
        "train_budget_s": train_budget_s,
        "sample_users": sample_users,
        "memory_limit_mb": memory_limit_mb,
        "isolated": not quick,
        "threads": torch.get_num_threads(),
        "lake": str(lake_root()),
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"


def to_markdown(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rows"]:
        if r["status"] != "ok":
            rows.append({"size": r["size"], "users": r["status"]})
            continue
        phases = (r["train_peak_rss_mb"], r["ours_peak_rss_mb"], r["old_sample_peak_rss_mb"])
        if all(phases):
            rss = " / ".join(f"{mb:,.0f}" for mb in phases) + " MB"
        else:
            rss = f"{r['peak_rss_mb']:,.0f} MB (whole process)" if r["peak_rss_mb"] else "n/a"
        rows.append(
            {
                "size": r["size"],
                "users": f"{r['users']:,}",
                "items": f"{r['items']:,}",
                "interactions": f"{r['interactions']:,}",
                "max_len": r["max_len"],
                "train targets/s": f"{r['targets_per_s']:,.0f}",
                "one epoch": _duration(r["epoch_s"])
                + ("" if r["whole_epoch_timed"] else " (extrap.)"),
                "retrieval, ours (rank_users)": _duration(r["ours_all_users_s"]),
                "whole matrix + sort (before)": _duration(r["old_all_users_s"]),
                "ratio": f"×{r['retrieval_speedup']:.1f}",
                "same candidates": "yes" if r["same_candidates"] else "**no**",
                "score memory, ours vs before": f"{r['ours_score_batch_mb']:,.0f} MB vs "
                f"{r['old_score_matrix_gb']:,.1f} GB",
                "peak RSS: training / ours / before (sample)": rss,
            }
        )
    return "\n".join(
        [
            "## Retriever at catalogue scale (`benchmarks/retrieval/bench.py`)",
            "",
            "LRURec with the published settings (d=64, 2 blocks, batch 64, AdamW), fp32, "
            f"{result['threads']} torch threads. Training: `train_step` (what `train_retriever` "
            f"runs) on its own batches for {result['train_budget_s']:.0f} s after one warm-up "
            "step; one epoch = all training targets at that rate (the retriever ran 30 epochs "
            "on ml-100k, early stopping included). Retrieval: val and test top-20 plus the "
            "target's rank for every user, timed side by side on the same "
            f"{result['sample_users']:,} sampled users and extrapolated per user: `rank_users` "
            "(256 users' scores at a time, top-k without a full sort) vs the whole score matrix "
            "and a stable sort of each row (how `retrieve_candidates` worked before). Score "
            "memory: one batch of 256 users vs the whole users × items fp32 matrix the old way "
            "holds (computed, not allocated). Peak RSS per phase (the process's high-water "
            "mark reset before each): training, `rank_users` on the sample, the old way on the "
            "same sample; each includes the data and model already loaded."
            + (
                " Each size ran in its own process; peak RSS is that process's."
                if result["isolated"]
                else " Quick mode, in-process (no peak RSS)."
            ),
            "",
            table(rows),
        ]
    )
