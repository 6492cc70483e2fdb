"""Does the frozen LLM already know what LoRA is asked to learn? A linear probe on its states.

    python -m benchmarks.llm.frozen_probe --prompts PROMPTS.parquet   # ~30 min on 2 CPU cores

The fine-tuning runs (`lora_adapter`, `make quality`) see a few hundred prompts; a probe sees
thousands for the cost of one forward pass each. The base model (bf16, the ranker's own windowed
segments attention) reads every prompt once; the hidden state at each candidate's segment end,
after a third and two thirds of the layers and after the final norm, is cached
(`data_lake/quality/frozen_probe/`). Then small heads (linear or one hidden layer of 64, on one
depth or all three, standardised features) are trained by softmax cross-entropy over the 20
candidates, alone or on top of the retriever's log-prior, on every train prompt or only those
whose true item the retriever put in its top 20 itself (the others had it put in by hand, as the
last candidate by the retriever's score). Every head is scored on the val subset, alone and
fused with the retriever (λ on val, core.llm.rank.fusion); the best fused one on val, and only
it, is then scored on test against the retriever (paired randomisation test over the 943 users,
three training seeds).

PROMPTS: a segments-format prompts file with many train rows, e.g. `prompts` after
`candidates` with `train_examples_per_user: 4` (3,772 train prompts on ml-100k). Writes the
`frozen_probe` section of benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from benchmarks.harness import (
    RESULTS_JSON,
    LakeFiles,
    lake_root,
    machine_info,
    save_results_section,
)
from lkg_pipeline.core.evaluate.compare import paired_randomization_test
from lkg_pipeline.core.evaluate.metrics import per_user_metrics
from lkg_pipeline.core.llm.rank.fusion import (
    LAMBDA_GRID,
    log_softmax,
    retriever_log_prior,
    target_ranks,
)
from lkg_pipeline.core.llm.rank.scoring import load_ranker, pad_token_id
from lkg_pipeline.core.llm.segments import decoder_inputs, segment_batch, tokenize_segments

# Where the states are read: after a third and two thirds of the layers (10 and 20 of
# SmolLM2's 30) and after the final norm.
DEPTHS = (1 / 3, 2 / 3, 1.0)
CHUNK = 250  # prompts per cached file: an interrupted extraction resumes at the next one
N_USERS = 943  # ml-100k: the overall population of the paired test


def layer_indices(model: Any) -> list[int]:
    """`hidden_states` indices of DEPTHS (the last entry is after the final norm)."""
    layers = model.config.num_hidden_layers
    return [round(d * layers) if d < 1 else -1 for d in DEPTHS]


def extract(model: Any, tokenizer: Any, prompts: pl.DataFrame, folder: Path) -> None:
    """Cache (N, 20, len(DEPTHS), H) segment-end states of each split, CHUNK prompts a file."""
    folder.mkdir(parents=True, exist_ok=True)
    layers = layer_indices(model)
    pad = pad_token_id(tokenizer)
    for split in ("val", "test", "train"):
        rows = prompts.filter(pl.col("split") == split)
        for first in range(0, rows.height, CHUNK):
            target = folder / f"{split}_{first:06d}.npz"
            if target.exists():
                continue
            part = rows.slice(first, CHUNK)
            states = []
            tick = time.perf_counter()
            with torch.inference_mode():
                for prefix, segments in zip(part["prompt"], part["segments"], strict=True):
                    batch = segment_batch([tokenize_segments(tokenizer, prefix, segments)], pad)
                    out = model.model(
                        **decoder_inputs(batch, model.dtype),
                        output_hidden_states=True,
                        use_cache=False,
                    )
                    ends = batch["ends"][0]
                    states.append(
                        torch.stack([out.hidden_states[i][0, ends] for i in layers], 1).float()
                    )  # (20, L, H)
            partial = target.with_suffix(".partial.npz")
            np.savez(
                partial,
                states=torch.stack(states).numpy(),
                target_index=part["target_index"].to_numpy(),
                retriever_scores=np.asarray(part["retriever_scores"].to_list(), np.float32),
            )
            partial.rename(target)
            seconds = (time.perf_counter() - tick) / part.height
            done = f"{split} {first + part.height}/{rows.height}"
            print(f"{done}: {seconds:.3f} s/prompt", flush=True)


def load(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(states, target index, retriever log-prior) of a split's cached prompts."""
    parts = [np.load(f) for f in sorted(folder.glob(f"{split}_*.npz"))]
    assert parts, f"no cached states for {split} under {folder}"
    states = np.concatenate([p["states"] for p in parts])
    targets = np.concatenate([p["target_index"] for p in parts]).astype(np.int64)
    prior = retriever_log_prior(np.concatenate([p["retriever_scores"] for p in parts]))
    return states, targets, prior


def per_user(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, 2) NDCG@10 and MRR@1 of each prompt (ties to the earlier candidate)."""
    metrics = per_user_metrics(target_ranks(scores, targets), ks=(1, 10))
    return np.stack([metrics["NDCG@10"], metrics["MRR@1"]], axis=1)


def train_head(
    states: np.ndarray,
    targets: np.ndarray,
    prior: np.ndarray,
    layers: list[int],
    hidden: int,
    epochs: int,
    residual: bool,
    seed: int,
) -> Any:
    """A head trained by CE over the 20 candidates; returns states -> (N, 20) scores."""
    torch.manual_seed(seed)
    x = torch.tensor(states[:, :, layers].reshape(len(states), 20, -1))
    mean, std = x.flatten(0, 1).mean(0), x.flatten(0, 1).std(0) + 1e-4
    x = (x - mean) / std
    width = x.shape[-1]
    if hidden:
        head = torch.nn.Sequential(
            torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1)
        )
    else:
        head = torch.nn.Linear(width, 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3 if hidden else 3e-3)
    y, offset = torch.tensor(targets), torch.tensor(prior, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=generator).split(256):
            scores = head(x[rows]).squeeze(-1) + (offset[rows] if residual else 0)
            loss = torch.nn.functional.cross_entropy(scores, y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def score(other: np.ndarray) -> np.ndarray:
        z = torch.tensor(other[:, :, layers].reshape(len(other), 20, -1))
        with torch.no_grad():
            return head((z - mean) / std).squeeze(-1).numpy()

    return score


def best_fusion(llm: np.ndarray, prior: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(val NDCG@10, λ) of the best fused score, ties to the smaller λ."""
    results = [
        (per_user(log_softmax(prior) + lam * log_softmax(llm), targets)[:, 0].mean(), -lam)
        for lam in LAMBDA_GRID
    ]
    value, neg_lam = max(results)
    return float(value), -neg_lam


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=Path, required=True, help="segments prompts Parquet")
    parser.add_argument("--base-model", type=Path, default=None, help="default: the lake's")
    parser.add_argument("--cache", type=Path, default=None, help="default: lake/quality/...")
    args = parser.parse_args(argv)
    lake = lake_root()
    base = args.base_model or LakeFiles(lake).base_model
    cache = args.cache or lake / "quality" / "frozen_probe"
    prompts = pl.read_parquet(args.prompts).filter(pl.col("target_index") >= 0)
    from transformers import AutoTokenizer

    model = load_ranker(base, None, "cpu", torch.bfloat16)
    extract(model, AutoTokenizer.from_pretrained(base), prompts, cache)
    del model

    train, val, test = (load(cache, s) for s in ("train", "val", "test"))
    rank = target_ranks(train[2], train[1])  # the retriever's rank of each train target
    pools = {"all": np.ones(len(rank), bool), "retrieved": rank < 20}
    retriever_val = float(per_user(val[2], val[1])[:, 0].mean())
    print(f"retriever, val subset NDCG@10 {retriever_val:.4f}")
    grid = []
    for pool, layers, hidden, epochs, residual in itertools.product(
        pools, ([1], [2], [0, 1, 2]), (0, 64), (3, 10, 30), (False, True)
    ):
        keep = pools[pool]
        score = train_head(
            train[0][keep], train[1][keep], train[2][keep], layers, hidden, epochs, residual, 0
        )
        llm = score(val[0])
        alone = per_user(llm + (val[2] if residual else 0), val[1])[:, 0].mean()
        fused, lam = best_fusion(llm, val[2], val[1])
        row = {
            "train": pool,
            "n_train": int(keep.sum()),
            "depths": [round(DEPTHS[i], 3) for i in layers],
            "hidden": hidden,
            "epochs": epochs,
            "residual": residual,
            "val_ndcg10_alone": round(float(alone), 4),
            "val_ndcg10_fused": round(fused, 4),
            "lambda": lam,
        }
        grid.append(row)
        print(json.dumps(row), flush=True)
    chosen = max(grid, key=lambda r: (r["val_ndcg10_fused"], -r["lambda"]))
    layers = [[round(d, 3) for d in DEPTHS].index(d) for d in chosen["depths"]]
    keep = pools[chosen["train"]]
    finals = []
    for seed in (0, 1, 2):
        score = train_head(
            train[0][keep],
            train[1][keep],
            train[2][keep],
            layers,
            chosen["hidden"],
            chosen["epochs"],
            chosen["residual"],
            seed,
        )
        fused_val, lam = best_fusion(score(val[0]), val[2], val[1])
        ours = per_user(log_softmax(test[2]) + lam * log_softmax(score(test[0])), test[1])
        theirs = per_user(test[2], test[1])
        misses = np.zeros((N_USERS - len(ours), 2))  # users whose true item is no candidate
        ours, theirs = np.vstack([ours, misses]), np.vstack([theirs, misses])
        p = paired_randomization_test(ours, theirs, 10_000, np.random.default_rng(0))
        finals.append(
            {
                "seed": seed,
                "lambda": lam,
                "val_ndcg10_fused": round(fused_val, 4),
                "test_overall_ndcg10": round(float(ours[:, 0].mean()), 4),
                "test_overall_ndcg10_retriever": round(float(theirs[:, 0].mean()), 4),
                "p_ndcg10": round(float(p[0]), 4),
                "test_overall_mrr1": round(float(ours[:, 1].mean()), 4),
                "test_overall_mrr1_retriever": round(float(theirs[:, 1].mean()), 4),
                "p_mrr1": round(float(p[1]), 4),
            }
        )
        print(json.dumps(finals[-1]), flush=True)
    section = {
        "machine": machine_info(),
        "prompts": str(args.prompts),
        "retriever_val_ndcg10": round(retriever_val, 4),
        "grid": grid,
        "chosen": chosen,
        "test": finals,
    }
    save_results_section(RESULTS_JSON, "frozen_probe", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
