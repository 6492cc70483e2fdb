"""The retriever's sampled softmax (`sampled_negatives`) against the full softmax, side by side.

    python -m benchmarks.retrieval.sampled_softmax          # Beauty-sized, a few minutes on 2 cores
    python -m benchmarks.retrieval.sampled_softmax --quick  # tiny, seconds (the smoke test)

Quality needs data with something to learn beyond popularity, so the users here walk a
synthetic catalogue of Beauty's size (22,363 users, 12,101 items, ~8.9 items per user, max_len
50): each item has a few "next" items, and a user's next item is one of the current item's with
probability `FOLLOW`, else a long-tail popularity draw. Both losses train the same model from
the same seed for the same epochs; validation Recall@10 / NDCG@10 rank the whole catalogue
either way. Speed: seconds per training step at Beauty's and at 10× Beauty's catalogue (121,010
items), where the full projection dominates. Writes benchmarks/retrieval/SAMPLED_SOFTMAX.md and the
`sampled_softmax` section of benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from benchmarks.harness import RESULTS_JSON, machine_info, save_results_section, table
from benchmarks.paths.bench import _long_tail
from lkg_pipeline.core.retrieval.lrurec import LRURec
from lkg_pipeline.core.retrieval.seqrec import RetrieverConfig
from lkg_pipeline.core.retrieval.sequences import user_sequences
from lkg_pipeline.core.retrieval.training import (
    bucketed_batches,
    make_optimizer,
    train_retriever,
    train_step,
    training_windows,
)

FOLLOW = 0.6  # share of steps that follow the current item's successors
SUCCESSORS = 4
BEAUTY = {"users": 22_363, "items": 12_101, "mean_len": 8.9}
NEGATIVES = (256, 1024)
HERE = Path(__file__).resolve().parent  # the topic folder: its pages and figures
OUT_MD = HERE / "SAMPLED_SOFTMAX.md"


def walks(n_users: int, n_items: int, mean_len: float, seed: int) -> pl.DataFrame:
    """The `sequences` contract: users walking successor lists, distinct items per user."""
    rng = np.random.default_rng(seed)
    popularity = _long_tail(n_items, rng)
    successors = rng.choice(n_items, size=(n_items, SUCCESSORS), p=popularity)
    lengths = 5 + rng.geometric(1 / (mean_len - 4), n_users) - 1
    budget = int(lengths.sum() * 10) + 100  # pre-drawn: one vectorised draw, not one per step
    draws = iter(rng.choice(n_items, size=budget, p=popularity).tolist())
    follow = iter((rng.random(budget) < FOLLOW).tolist())
    rows = []
    for u, length in enumerate(lengths):
        seen: dict[int, None] = {next(draws): None}  # insertion-ordered set
        last = next(iter(seen))
        while len(seen) < length:
            item = int(successors[last, next(draws) % SUCCESSORS]) if next(follow) else next(draws)
            if item in seen:  # already seen: a popularity draw instead
                item = next(draws)
            if item not in seen:
                seen[item] = None
                last = item
        n = len(seen)
        rows += [
            (u, item, p, "test" if p == n - 1 else "val" if p == n - 2 else "train")
            for p, item in enumerate(seen)
        ]
    return pl.DataFrame(
        rows,
        schema={
            "user_idx": pl.Int32,
            "item_idx": pl.Int32,
            "position": pl.Int32,
            "split": pl.String,
        },
        orient="row",
    )


def step_seconds(n_items: int, negatives: int | None, steps: int, seed: int = 0) -> float:
    """Mean seconds of a training step (batch 64 windows of 50) after one warm-up."""
    config = RetrieverConfig(n_items=n_items, max_len=50, sampled_negatives=negatives, seed=seed)
    torch.manual_seed(seed)
    model = LRURec(config)
    optimizer = make_optimizer(model, config)
    rng = np.random.default_rng(seed)
    windows = [rng.choice(n_items, size=51, replace=False).tolist() for _ in range(64)]
    generator = torch.Generator().manual_seed(seed)
    train_step(model, optimizer, windows, config, generator)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, windows, config, generator)
    return (time.perf_counter() - started) / steps


def run(quick: bool) -> dict[str, Any]:
    size = {"users": 600, "items": 400, "mean_len": 8.9} if quick else BEAUTY
    epochs = 2 if quick else 12
    sequences = walks(size["users"], size["items"], size["mean_len"], seed=0)
    data = user_sequences(sequences, n_items=size["items"])
    rows = []
    for negatives in (None, *NEGATIVES):
        if negatives is not None and negatives >= size["items"]:
            continue
        config = RetrieverConfig(
            n_items=size["items"],
            max_len=50,
            max_epochs=epochs,
            patience=epochs,
            sampled_negatives=negatives,
        )
        result = train_retriever(data, config)
        rows.append(
            {
                "loss": "full softmax" if negatives is None else f"sampled, {negatives} negatives",
                "epochs": epochs,
                "best_epoch": result.best_epoch,
                "val_Recall@10": round(result.best_val["Recall@10"], 4),
                "val_NDCG@10": round(result.best_val["NDCG@10"], 4),
                "s_per_epoch": round(result.wall_time_s / len(result.history), 1),
            }
        )
        print(rows[-1], flush=True)
    full = rows[0]
    for row in rows:
        row["recall_vs_full"] = round(row["val_Recall@10"] / full["val_Recall@10"], 3)
    steps = []
    catalogues = (400,) if quick else (BEAUTY["items"], 10 * BEAUTY["items"])
    for n_items in catalogues:
        base = step_seconds(n_items, None, 2 if quick else 5)
        for negatives in NEGATIVES[:1] if quick else NEGATIVES:
            if negatives >= n_items:
                continue
            sampled = step_seconds(n_items, negatives, 2 if quick else 5)
            steps.append(
                {
                    "items": n_items,
                    "negatives": negatives,
                    "full_s_per_step": round(base, 4),
                    "sampled_s_per_step": round(sampled, 4),
                    "speedup": round(base / sampled, 2),
                }
            )
    windows = training_windows(data.train, 50, 50)
    batches = bucketed_batches(np.array([len(w) for w in windows]), 64, torch.Generator())
    return {
        "machine": machine_info(),
        "quick": quick,
        "data": {
            **size,
            "follow": FOLLOW,
            "successors": SUCCESSORS,
            "steps_per_epoch": len(batches),
        },
        "quality": rows,
        "step_time": steps,
    }


def to_markdown(result: dict[str, Any]) -> str:
    m, d = result["machine"], result["data"]
    return "\n".join(
        [
            "# The retriever's sampled softmax vs the full softmax",
            "",
            f"`python -m benchmarks.retrieval.sampled_softmax` on {m['cpu_model']}, "
            f"{m['nproc']} cores, torch {m['torch']}, {m['date_utc']}. Synthetic walks "
            f"({d['users']:,} users, {d['items']:,} items, ~{d['mean_len']} items per user; "
            f"a user follows one of the current item's {d['successors']} successors with "
            f"probability {d['follow']}), max_len 50, the same seed and epochs for every loss; "
            "validation ranks the whole catalogue.",
            "",
            table(result["quality"]),
            "",
            "Seconds per training step (64 windows of 50), full softmax vs sampled:",
            "",
            table(result["step_time"]),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retrieval.sampled_softmax")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    result = run(args.quick)
    markdown = to_markdown(result)
    print(markdown)
    if not args.quick:
        OUT_MD.write_text(markdown)
        save_results_section(RESULTS_JSON, "sampled_softmax", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
