"""`make bench-dtype`: the LLM in fp32 and bf16 side by side on this machine, and whether bf16
ranks the same.

    python -m benchmarks.llm_dtype                  # all test-subset prompts, both dtypes
    python -m benchmarks.llm_dtype --prompts 40     # a quicker look

Measured in one process, one dtype after the other, with nothing else running: the GEMM
ceilings of the model's own shapes, ranking prompts/s on the real ml-100k test prompts whose
true item is a candidate, LoRA training tokens/s (a few optimizer steps of the pipeline's
recipe), and the quality guard: subset NDCG@10 of each dtype's rankings and the share of
prompts whose top candidate agrees. Writes the `llm_dtype` section of benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from benchmarks.common import REPO, lake_root, machine_info
from benchmarks.quality import RECIPE, Row, base_model, prompts_file
from lkg_pipeline.core.metrics import ranking_metrics
from lkg_pipeline.core.precision import (
    choose_dtype,
    cpu_flags,
    cpu_model,
    gemm_gflops,
    model_gemm_shape,
)
from lkg_pipeline.core.ranking import load_ranker, rank_prompts
from lkg_pipeline.core.train_lora import RunPaths, training_function

RESULTS_JSON = REPO / "benchmarks" / "results.json"
DTYPES = ("float32", "bfloat16")


def ceilings(config: Any) -> dict[str, Any]:
    """GFLOP/s of the model's own GEMMs (MLP up-projection, attention q-projection) per dtype."""
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes = {"mlp_up_1024_tokens": (1024, hidden, inner), "q_proj_1024": (1024, hidden, hidden)}
    out = {}
    for name, shape in shapes.items():
        rates = {d: 0.0 for d in DTYPES}
        for _ in range(3):  # alternating, best of 3 (core.precision explains why)
            for d in DTYPES:
                rates[d] = max(rates[d], gemm_gflops(getattr(torch, d), shape, 0.2))
        out[name] = {
            **{f"{d}_gflops": round(r, 1) for d, r in rates.items()},
            "bf16_speedup": round(rates["bfloat16"] / rates["float32"], 2),
        }
    return out


def run(n_prompts: int | None, row: Row, train_steps: int) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    lake = lake_root()
    base = base_model(lake)
    config = AutoConfig.from_pretrained(base)
    auto = choose_dtype("auto", "cpu", model_gemm_shape(config))
    adapter = lake / "quality" / row.name / "adapter"
    adapter = adapter if (adapter / "adapter_config.json").exists() else None
    prompts = pl.read_parquet(prompts_file(lake, row.variant, row.format)).filter(
        (pl.col("split") == "test") & (pl.col("target_index") >= 0)
    )
    if n_prompts:
        prompts = prompts.head(n_prompts)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ranked: dict[str, pl.DataFrame] = {}
    section: dict[str, Any] = {
        "machine": machine_info(),
        "cpu_model": cpu_model(),
        "machine_flags": cpu_flags(),
        "chosen_dtype": auto.chosen,
        "auto_reason": auto.reason,
        "ceilings": ceilings(config),
        "prompts": {"row": row.name, "adapter": str(adapter), "n": prompts.height},
    }
    for dtype in DTYPES:
        model = load_ranker(base, adapter, "cpu", getattr(torch, dtype))
        rank_prompts(model, tokenizer, prompts.head(2))  # warm-up: kernels, allocator
        tick = time.perf_counter()
        ranked[dtype] = rank_prompts(model, tokenizer, prompts)
        seconds = time.perf_counter() - tick
        ranks = ranked[dtype]["target_rank"].cast(pl.Float64).to_numpy()
        section[dtype] = {
            "ranking_prompts_per_s": prompts.height / seconds,
            "ranking_tokens_per_s": float(prompts["n_tokens"].sum()) / seconds,
            "ndcg10": ranking_metrics(ranks, (10,))["NDCG@10"],
        }
        print(f"{dtype}: {section[dtype]}", flush=True)
        del model
    # the recipe in each dtype, then bf16 without LoRA dropout (the pipeline's default since
    # this measured it: dropout's mask and multiply cost a quarter of a CPU training step)
    for dtype, dropout, key in (
        ("float32", RECIPE.lora_dropout, "training_tokens_per_s"),
        ("bfloat16", RECIPE.lora_dropout, "training_tokens_per_s"),
        ("bfloat16", 0.0, "training_tokens_per_s_no_dropout"),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            probe = dataclasses.replace(
                RECIPE,
                dtype=dtype,
                lora_dropout=dropout,
                max_steps=train_steps,
                grad_accum=4,
                max_val_examples=1,
                eval_every=10_000,
                checkpoint_every=10_000,
                log_every=1,
            )
            result = training_function(
                probe,
                RunPaths(prompts_file(lake, row.variant, row.format), base, Path(tmp) / "a"),
                resume=False,
            )
            section[dtype][key] = result.summary["tokens_per_s"]
        print(f"{dtype} {key} (dropout {dropout}): {section[dtype][key]:.0f}", flush=True)
    fp32, bf16 = ranked["float32"], ranked["bfloat16"]
    top = [a[0] == b[0] for a, b in zip(fp32["ranked_item_idxs"], bf16["ranked_item_idxs"])]
    section.update(
        ranking_prompts_per_s={d: section[d]["ranking_prompts_per_s"] for d in DTYPES},
        training_tokens_per_s={d: section[d]["training_tokens_per_s"] for d in DTYPES},
        ranking_speedup_vs_fp32=section["bfloat16"]["ranking_prompts_per_s"]
        / section["float32"]["ranking_prompts_per_s"],
        training_speedup_vs_fp32=section["bfloat16"]["training_tokens_per_s"]
        / section["float32"]["training_tokens_per_s"],
        no_dropout_training_speedup=section["bfloat16"]["training_tokens_per_s_no_dropout"]
        / section["bfloat16"]["training_tokens_per_s"],
        top1_agreement=float(np.mean(top)),
        ndcg10_fp32=section["float32"]["ndcg10"],
        ndcg10_bf16=section["bfloat16"]["ndcg10"],
    )
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm_dtype")
    parser.add_argument("--prompts", type=int, default=None, help="test prompts (default: all)")
    parser.add_argument("--row", default="lkg_rag-segments-tuned", help="a benchmarks.quality row")
    parser.add_argument("--train-steps", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    variant, fmt, kind = args.row.split("-")
    section = run(args.prompts, Row(variant, fmt, kind == "tuned"), args.train_steps)
    saved = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    saved["llm_dtype"] = json.loads(json.dumps(section, default=str))
    partial = RESULTS_JSON.with_suffix(".partial")
    partial.write_text(json.dumps(saved, indent=2, default=str))
    partial.replace(RESULTS_JSON)
    keys = ("chosen_dtype", "ranking_speedup_vs_fp32", "training_speedup_vs_fp32",
            "no_dropout_training_speedup", "top1_agreement", "ndcg10_fp32",
            "ndcg10_bf16")  # fmt: skip
    print(json.dumps({k: section[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
