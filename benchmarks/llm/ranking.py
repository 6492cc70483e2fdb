"""Ranking throughput: prompts per second of the ranker under four batching policies.

`rankings` scores a prompt with one forward pass and reads the 20 letter logits at the last
position. How prompts are grouped into forwards, and whether the vocabulary projection runs for
every position or only the last, decide the throughput on a CPU:

- batch 1: no padding, no batching gains;
- batch 8 in arrival order: prompts of different lengths share a forward, so short ones are
  padded to the longest;
- batch 8, length-bucketed (ours, `score_prompts_timed`): sorted by length first, little padding;
- the reference's way: batch 8 in arrival order and a plain forward that computes the logits of
  every position (no `logits_to_keep`), of which only the last is read.

Achieved FLOP/s = 2 × non-embedding parameters × prompt tokens per second (the usual forward
estimate; padding and the vocabulary projection are work it does not count), shown as a share
of the dense fp32 matmul FLOP/s measured on the same machine, in the same run, with the same
number of threads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from benchmarks.harness import LakeFiles, ceiling, lake_root, require_lake, si, table
from lkg_pipeline.core.llm.model import LETTERS, letter_token_ids, load_base
from lkg_pipeline.core.llm.rank.scoring import (
    left_pad,
    load_ranker,
    pad_token_id,
    score_prompts_timed,
    tokenize_prompt,
)

BATCH = 8
POLICIES = (
    "batch 1",
    f"arrival order, batch {BATCH}",
    f"length-bucketed, batch {BATCH} (ours)",
    f"reference: all logits, arrival order, batch {BATCH}",
)


@dataclass(frozen=True)
class Scored:
    scores: torch.Tensor  # (N, 20) letter logits in prompt order
    seconds: float  # wall time of the whole call, tokenisation included
    padded_tokens: int  # positions the forwards computed, padding included


def non_embedding_parameters(model: Any) -> int:
    """Parameters that cost a multiply-add per token: all but the input embedding and the
    output projection (tied in SmolLM2), whose per-token cost is a lookup / not in 2N."""
    skip = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        skip.add(id(output.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def padded_size(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Positions computed when each batch is padded to its longest prompt."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def arrival_order(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int, all_logits: bool
) -> Scored:
    """Letter logits with prompts batched in the order they came, left-padded as ours are.

    all_logits: a plain forward (the reference's), projecting every position onto the
    vocabulary; otherwise `logits_to_keep=1`, as `score_prompts_timed` does.
    """
    tick = time.perf_counter()
    pad_id = pad_token_id(tokenizer)
    rows = [tokenize_prompt(tokenizer, p) for p in prompts]
    letters = torch.tensor([letter_token_ids(tokenizer, p) for p in prompts])  # (N, 20)
    batches = [
        list(range(s, min(s + batch_size, len(rows)))) for s in range(0, len(rows), batch_size)
    ]
    out = torch.empty((len(rows), len(LETTERS)))  # (N, 20)
    keep = {} if all_logits else {"logits_to_keep": 1}
    with torch.inference_mode():
        for idx in batches:
            batch = left_pad([rows[i] for i in idx], pad_id)
            logits = model(**batch, use_cache=False, **keep).logits[:, -1]  # (B, V)
            out[idx] = logits.float().gather(1, letters[idx])
    seconds = time.perf_counter() - tick
    return Scored(out, seconds, padded_size([len(r) for r in rows], batches))


def bucketed(model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int) -> Scored:
    """Ours: `score_prompts_timed`, the function `rankings` calls."""
    tick = time.perf_counter()
    scored = score_prompts_timed(model, tokenizer, prompts, batch_size)
    seconds = time.perf_counter() - tick
    lengths = scored.n_tokens.tolist()
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # as it batches them
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return Scored(scored.scores, seconds, padded_size(lengths, batches))


def measure(model: Any, tokenizer: Any, prompts: list[str], quick: bool) -> dict[str, Any]:
    """Every policy on the same prompts, one after the other, with the scores compared."""
    model.eval()
    threads = torch.get_num_threads()
    peak = ceiling(quick, threads)
    n_params = non_embedding_parameters(model)
    tokens = sum(len(tokenize_prompt(tokenizer, p)) for p in prompts)
    score_prompts_timed(model, tokenizer, prompts[:1], 1)  # warm-up: first-call allocations
    runs = {
        POLICIES[0]: lambda: bucketed(model, tokenizer, prompts, 1),
        POLICIES[1]: lambda: arrival_order(model, tokenizer, prompts, BATCH, all_logits=False),
        POLICIES[2]: lambda: bucketed(model, tokenizer, prompts, BATCH),
        POLICIES[3]: lambda: arrival_order(model, tokenizer, prompts, BATCH, all_logits=True),
    }
    rows, baseline = [], None
    for policy, call in runs.items():
        scored = call()
        baseline = scored.scores if baseline is None else baseline
        tokens_per_s = tokens / scored.seconds
        flops = 2 * n_params * tokens_per_s
        rows.append(
            {
                "policy": policy,
                "seconds": scored.seconds,
                "prompts_per_s": len(prompts) / scored.seconds,
                "tokens_per_s": tokens_per_s,
                "padding_share": 1 - tokens / scored.padded_tokens,
                "flops_per_s": flops,
                "share_of_matmul": flops / peak["flops_per_s"],
                "max_abs_score_diff_vs_batch_1": float((scored.scores - baseline).abs().max()),
            }
        )
        print(
            f"  ranking, {policy}: {rows[-1]['prompts_per_s']:.3f} prompts/s, "
            f"{si(flops, 'FLOP/s')} = {100 * rows[-1]['share_of_matmul']:.1f}% of matmul",
            flush=True,
        )
    for row in rows:
        row["speedup_vs_batch_1"] = row["prompts_per_s"] / rows[0]["prompts_per_s"]
    return {
        "prompts": len(prompts),
        "prompt_tokens": tokens,
        "mean_tokens": tokens / len(prompts),
        "min_tokens": min(len(tokenize_prompt(tokenizer, p)) for p in prompts),
        "max_tokens": max(len(tokenize_prompt(tokenizer, p)) for p in prompts),
        "non_embedding_parameters": n_params,
        "threads": threads,
        "matmul": peak,
        "policies": rows,
    }


def real_prompts(lake: LakeFiles, n: int = 24, seed: int = 0) -> list[str]:
    """A seeded sample of the test prompts `rankings` scores (true item among the candidates),
    in shuffled order: arrival order is unrelated to length, as in serving."""
    frame = pl.read_parquet(lake.prompts).filter(
        (pl.col("split") == "test") & (pl.col("target_index") >= 0)
    )
    return frame.sample(n=min(n, frame.height), seed=seed, shuffle=True)["prompt"].to_list()


def synthetic_prompts(n: int = 10, seed: int = 0) -> list[str]:
    """Prompts in the pipeline's layout with histories of different lengths (so padding
    matters), for the tiny model in quick mode."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        history = "\n".join(f"({j + 1}) film {i}-{j}" for j in range(int(rng.integers(1, 15))))
        pool = "\n".join(f"({letter}) item {i}-{c}" for c, letter in enumerate(LETTERS))
        prompts.append(f"User history:\n{history}\n\nCandidate pool:\n{pool}\nAnswer:")
    return prompts


def run(quick: bool, out_dir: Path | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """smollm2-135m on real test prompts; quick: the tiny random Llama on synthetic ones."""
    if quick:
        cache = cache_dir or LakeFiles(lake_root()).cache
        model, tokenizer, _ = load_base("tiny-random", cache)
        prompts, source = synthetic_prompts(), "tiny-random, synthetic prompts"
    else:
        from transformers import AutoTokenizer

        lake = require_lake("prompts", "base_model")
        model = load_ranker(lake.base_model, None, device="cpu")
        tokenizer = AutoTokenizer.from_pretrained(lake.base_model)
        prompts, source = real_prompts(lake), "smollm2-135m, real ml-100k test prompts (lkg_rag)"
    result = measure(model, tokenizer, prompts, quick)
    return result | {"source": source}


def to_markdown(result: dict[str, Any]) -> str:
    rows = [
        {
            "policy": r["policy"],
            "prompts/s": f"{r['prompts_per_s']:.3f}",
            "× batch 1": f"{r['speedup_vs_batch_1']:.2f}",
            "tokens/s": f"{r['tokens_per_s']:,.0f}",
            "padding": f"{100 * r['padding_share']:.1f}%",
            "achieved FLOP/s": si(r["flops_per_s"]),
            "share of matmul": f"{100 * r['share_of_matmul']:.1f}%",
            "max abs Δscore vs batch 1": f"{r['max_abs_score_diff_vs_batch_1']:.1e}",
        }
        for r in result["policies"]
    ]
    m = result["matmul"]
    return "\n".join(
        [
            "## Ranking throughput (`benchmarks/llm/ranking.py`)",
            "",
            f"{result['source']}: {result['prompts']} prompts, {result['prompt_tokens']:,} tokens "
            f"(mean {result['mean_tokens']:.0f}, {result['min_tokens']}–{result['max_tokens']}), "
            f"{result['non_embedding_parameters'] / 1e6:.1f} M non-embedding parameters, "
            f"{result['threads']} torch threads, fp32, no adapter. Each policy scores the same "
            "prompts once, one after the other; wall time includes tokenisation.",
            "",
            table(rows),
            "",
            f"Achieved FLOP/s = 2 × non-embedding parameters × prompt tokens/s (padding and the "
            f"vocabulary projection are not counted as useful work); the ceiling is fp32 "
            f"`torch.matmul` {m['n']}×{m['n']}, best of {m['repeats']}: "
            f"{si(m['flops_per_s'], 'FLOP/s')} (median {si(m['median_flops_per_s'], 'FLOP/s')}) "
            f"on {m['threads']} threads. The last column checks that every policy gives the "
            "batch-1 scores (left padding with explicit positions).",
        ]
    )
