"""LoRA training throughput: tokens per second of forward + backward + AdamW step by loss.

`train_lora` trains on the 20 letter logits at the last position (`logits_to_keep=1`); its
`loss: lm` option is the reference's LM loss on the answer tokens (letter, EOS), computed from
the last three positions only (`logits_to_keep=3`). The reference itself computes the logits of
every position and masks all but the answer in the labels. The three are timed on the same real
train prompts with the same LoRA (r, α, dropout, q/v projections as `TrainConfig`), each in its
own process so each peak RSS is its own.

Achieved FLOP/s = 6 × non-embedding parameters × tokens/s, the usual training estimate, as a
share of the dense fp32 matmul FLOP/s measured in the same run. With frozen base weights LoRA
skips the weight gradients (about a third of that work) and the reference's full vocabulary
projection adds work the estimate does not count, so the share compares the variants with
each other and with the machine, not exactly.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import psutil
import torch

from benchmarks.harness import (
    LakeFiles,
    ceiling,
    current_rss_mb,
    lake_root,
    require_lake,
    run_isolated,
    si,
    table,
)
from lkg_pipeline.core.llm.model import LETTERS, load_base
from lkg_pipeline.core.llm.prompts import PROMPT_COLUMNS
from lkg_pipeline.core.llm.rank.scoring import max_positions
from lkg_pipeline.core.llm.train.config import TrainConfig, lora_config, make_accelerator
from lkg_pipeline.core.llm.train.data import get_dataloaders
from lkg_pipeline.core.llm.train.loop import batch_loss

# variant → the TrainConfig loss whose data it trains on
VARIANTS = {
    "letters (ours, logits_to_keep=1)": "letters",
    "lm (ours, logits_to_keep=3)": "lm",
    "lm, all logits (reference)": "lm",
}
REFERENCE = "lm, all logits (reference)"


def reference_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference's LM loss: a plain forward with labels, every position projected onto the
    vocabulary, the prompt masked (-100) so only the answer (letter, EOS) counts. Hugging Face
    shifts the labels itself."""
    labels = torch.full_like(batch["input_ids"], -100)  # (B, T)
    labels[:, -2:] = batch["input_ids"][:, -2:]  # left padding: the answer is the last 2 columns
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return model(**inputs, labels=labels, use_cache=False).loss


def non_embedding_parameters(model: Any) -> int:
    """Base-model parameters that cost multiply-adds per token (embeddings excluded)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    skip = {id(base.get_input_embeddings().weight)}
    output = base.get_output_embeddings()
    if output is not None:
        skip.add(id(output.weight))
    return sum(p.numel() for p in base.parameters() if id(p) not in skip)


def train_steps(
    base_model: str, prompts: str, variant: str, n_prompts: int, threads: int
) -> dict[str, Any]:
    """One optimizer step per prompt (batch 1, as `train_lora` runs on CPU) after one untimed
    warm-up step; the data come from `get_dataloaders`, the loss from `batch_loss`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = TrainConfig(
        loss=VARIANTS[variant],
        max_train_examples=n_prompts,
        max_val_examples=1,
        batch_size=1,
        grad_accum=1,
    )
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    base.config.use_cache = False
    model = get_peft_model(base, lora_config(config))
    loader, _, _ = get_dataloaders(
        make_accelerator(config), config, tokenizer, Path(prompts), max_positions(base)
    )
    batches = list(loader)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    rss_loaded = current_rss_mb()

    def step(batch: dict[str, torch.Tensor]) -> float:
        if variant == REFERENCE:
            loss = reference_lm_loss(model, batch)
        else:
            loss = batch_loss(model, batch, config.loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    model.train()
    step(batches[0])  # warm-up: optimizer state, first-call allocations
    tokens, seconds, losses = 0, 0.0, []
    for batch in batches:
        tick = time.perf_counter()
        losses.append(step(batch))
        seconds += time.perf_counter() - tick
        tokens += int(batch["attention_mask"].sum())
    return {
        "variant": variant,
        "prompts": len(batches),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "non_embedding_parameters": non_embedding_parameters(model),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "rss_after_load_mb": rss_loaded,
        "mean_loss": float(np.mean(losses)),
    }


def synthetic_prompt_file(path: Path, n: int = 8, seed: int = 0) -> Path:
    """A prompts file in the pipeline's contract (train and val rows) for quick mode."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        history = "\n".join(f"({j + 1}) film {i}-{j}" for j in range(int(rng.integers(1, 12))))
        pool = "\n".join(f"({letter}) item {i}-{c}" for c, letter in enumerate(LETTERS))
        rows.append(
            {
                "example_id": i,
                "user_idx": i,
                "split": "val" if i == n - 1 else "train",
                "variant": "lkg_rag",
                "prompt": f"User history:\n{history}\n\nCandidate pool:\n{pool}\nAnswer:",
                "candidate_item_idxs": list(range(100 * i, 100 * i + len(LETTERS))),
                "target_index": i % len(LETTERS),
                "n_tokens": 0,
            }
        )
    pl.DataFrame(rows, schema=PROMPT_COLUMNS).write_parquet(path)
    return path


def run(quick: bool, out_dir: Path | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """smollm2-135m on 6 real train prompts, each variant in its own process; quick: the tiny
    random Llama on synthetic prompts, in this process (seconds, but peak RSS is shared)."""
    threads = torch.get_num_threads()
    peak = ceiling(quick, threads)
    with tempfile.TemporaryDirectory(prefix="lkg_train_bench_") as tmp:
        if quick:
            model, tokenizer, _ = load_base(
                "tiny-random", cache_dir or LakeFiles(lake_root()).cache
            )
            base = Path(tmp) / "tiny"
            model.save_pretrained(base)
            tokenizer.save_pretrained(base)
            prompts = synthetic_prompt_file(Path(tmp) / "prompts.parquet")
            source, n_prompts = "tiny-random, synthetic prompts", 4
        else:
            lake = require_lake("prompts", "base_model")
            base, prompts = lake.base_model, lake.prompts
            source, n_prompts = "smollm2-135m, real ml-100k train prompts (lkg_rag)", 6
        rows = []
        for variant in VARIANTS:
            kwargs = {
                "base_model": str(base),
                "prompts": str(prompts),
                "variant": variant,
                "n_prompts": n_prompts,
                "threads": threads,
            }
            if quick:
                result = train_steps(**kwargs) | {"peak_rss_mb": None}
            else:
                isolated = run_isolated(
                    "benchmarks.llm.training:train_steps",
                    kwargs,
                    timeout_s=480,
                    memory_limit_mb=0.7 * psutil.virtual_memory().available / 2**20,
                )
                if not isolated.ok:
                    rows.append(
                        {"variant": variant, "status": f"{isolated.status}: {isolated.error}"}
                    )
                    print(f"  training, {variant}: {isolated.status} {isolated.error}", flush=True)
                    continue
                result = isolated.result
            flops = 6 * result["non_embedding_parameters"] * result["tokens_per_s"]
            rows.append(
                result
                | {
                    "status": "ok",
                    "flops_per_s": flops,
                    "share_of_matmul": flops / peak["flops_per_s"],
                }
            )
            rss = f"{result['peak_rss_mb']:,.0f} MB" if result["peak_rss_mb"] else "n/a"
            print(
                f"  training, {variant}: {result['tokens_per_s']:,.0f} tok/s, "
                f"{100 * flops / peak['flops_per_s']:.1f}% of matmul, peak RSS {rss}",
                flush=True,
            )
    done = [r for r in rows if r["status"] == "ok"]
    for row in done:
        row["speed_vs_letters"] = row["tokens_per_s"] / done[0]["tokens_per_s"]
    return {
        "source": source,
        "threads": threads,
        "isolated": not quick,
        "matmul": peak,
        "variants": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    rows = []
    for r in result["variants"]:
        if r["status"] != "ok":
            rows.append({"loss": r["variant"], "tokens/s": r["status"]})
            continue
        rows.append(
            {
                "loss": r["variant"],
                "tokens/s": f"{r['tokens_per_s']:,.0f}",
                "× letters": f"{r['speed_vs_letters']:.2f}",
                "s per prompt": f"{r['seconds'] / r['prompts']:.2f}",
                "achieved FLOP/s (6N)": si(r["flops_per_s"]),
                "share of matmul": f"{100 * r['share_of_matmul']:.1f}%",
                "peak RSS": f"{r['peak_rss_mb']:,.0f} MB" if r["peak_rss_mb"] else "n/a",
                "RSS after load": f"{r['rss_after_load_mb']:,.0f} MB",
                "mean loss": f"{r['mean_loss']:.3f}",
            }
        )
    ok = [r for r in result["variants"] if r["status"] == "ok"]
    first = ok[0] if ok else {}
    m = result["matmul"]
    return "\n".join(
        [
            "## LoRA training throughput (`benchmarks/llm/training.py`)",
            "",
            f"{result['source']}: {first.get('prompts', 0)} prompts, "
            f"{first.get('tokens', 0):,} tokens per pass, batch 1, one AdamW step per prompt "
            f"after one untimed warm-up step; LoRA r=8, α=32, dropout 0.05 on q/v "
            f"({first.get('trainable_parameters', 0):,} trainable of "
            f"{first.get('non_embedding_parameters', 0) / 1e6:.1f} M non-embedding parameters), "
            f"fp32, {result['threads']} torch threads"
            + (
                "; each loss in its own process (peak RSS = that process's `VmHWM`)."
                if result["isolated"]
                else "; quick mode, in-process (no peak RSS)."
            ),
            "",
            table(rows),
            "",
            "Achieved FLOP/s = 6 × non-embedding parameters × tokens/s, against fp32 "
            f"`torch.matmul` {m['n']}×{m['n']} at {si(m['flops_per_s'], 'FLOP/s')}. LoRA does "
            "not compute the frozen weights' gradients (~⅓ of 6N) and the reference's loss "
            "projects every position onto the 49k-token vocabulary (work 6N does not count).",
        ]
    )
