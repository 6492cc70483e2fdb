"""`make bench-dtype`: the LLM in fp32 and bf16 side by side on this machine, and whether bf16
ranks the same.

    python -m benchmarks.llm.dtype                  # all test-subset prompts, both dtypes
    python -m benchmarks.llm.dtype --prompts 40     # a quicker look
    python -m benchmarks.llm.dtype --section llm_dtype_amd_epyc   # beside another machine's

Measured in one process, one dtype after the other, with nothing else running: the GEMM
ceilings of the model's own shapes, ranking prompts/s on the real ml-100k test prompts whose
true item is a candidate (on the attention path the probe picks here, as `rankings`), LoRA
training tokens/s (a few optimizer steps of the pipeline's recipe), and the quality guard:
subset NDCG@10 of each dtype's rankings and the share of prompts whose top candidate agrees.
Then the ablation (`--ablation-prompts`, default 12): what each bf16 technique of the LLM
stages buys, the configurations taking turns on the same prompts.
Prompts and adapter: `make quality`'s for the row where it ran, else the pipeline's own
(`make run`). Writes the `llm_dtype` section of benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time
import types
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import polars as pl
import torch

from benchmarks.harness import (
    DATASET,
    RESULTS_JSON,
    lake_root,
    machine_info,
    save_results_section,
    taking_turns,
)
from benchmarks.quality.rankers import EVERY_LAYER_RECIPE, Row, base_model, prompts_file
from lkg_pipeline.core.evaluate.metrics import ranking_metrics
from lkg_pipeline.core.llm.precision import choose_dtype, gemm_gflops, model_gemm_shape
from lkg_pipeline.core.llm.probes import cpu_flags, cpu_model
from lkg_pipeline.core.llm.rank.job import choose_paths
from lkg_pipeline.core.llm.rank.scoring import load_ranker, prompt_segments, rank_prompts
from lkg_pipeline.core.llm.train.config import RunPaths, TrainConfig
from lkg_pipeline.core.llm.train.loop import training_function
from lkg_pipeline.defs import layout

DTYPES = ("float32", "bfloat16")


def ceilings(config: Any) -> dict[str, Any]:
    """GFLOP/s of the model's own GEMMs (MLP up-projection, attention q-projection) per dtype."""
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes = {"mlp_up_1024_tokens": (1024, hidden, inner), "q_proj_1024": (1024, hidden, hidden)}
    out = {}
    for name, shape in shapes.items():
        rates = {d: 0.0 for d in DTYPES}
        for _ in range(3):  # alternating, best of 3 (core.llm.precision explains why)
            for d in DTYPES:
                rates[d] = max(rates[d], gemm_gflops(getattr(torch, d), shape, 0.2))
        out[name] = {
            **{f"{d}_gflops": round(r, 1) for d, r in rates.items()},
            "bf16_speedup": round(rates["bfloat16"] / rates["float32"], 2),
        }
    return out


def _segment_rows(tokenizer: Any, prompts: pl.DataFrame) -> tuple[list[Any], tuple[int, int]]:
    from lkg_pipeline.core.llm.rank.scoring import prompt_segments
    from lkg_pipeline.core.llm.segments import answer_token_ids, tokenize_segments

    segments = prompt_segments(prompts)
    assert segments is not None, "the ablation measures the segments format"
    rows = [tokenize_segments(tokenizer, p, s) for p, s in zip(prompts["prompt"], segments)]
    return rows, answer_token_ids(tokenizer, segments[0][0])


def training_precision(model: Any, autocast: torch.dtype | None) -> Any:
    """The context `lora_adapter`'s training forward runs in on CPU (`Run.low_precision`:
    autocast to `autocast` with peft's input casts off; None: fp32 as it is), for a step
    timed outside a training run."""
    from lkg_pipeline.core.llm.train.loop import Run

    holder = Run.__new__(Run)  # only its low_precision() and the fields it reads
    holder.model, holder.autocast = model, autocast
    holder.accelerator = types.SimpleNamespace(device=torch.device("cpu"))
    return holder.low_precision()


def ablation(
    base: Path, adapter: Path | None, prompts: pl.DataFrame, tokenizer: Any
) -> dict[str, Any]:
    """What each bf16 change buys, side by side in one process: the configurations take turns
    on every prompt (so drifts of the machine's speed hit all alike) and each reports its
    median seconds per prompt. Ranking: the previous path (dense T×T block mask, the adapter
    as peft's fp32 branch), windowed attention on torch's SDPA kernel, then the adapter
    folded, then the RMSNorms fused too, then the windows as `segments.grouped_attention`'s
    matmuls (the pipeline's path now). Training (forward + backward of one prompt, LoRA on
    all linear layers): peft's fp32 branch, then under autocast, then with fused RMSNorms,
    each with attention on the kernel, then as matmuls, first over fp32 copies of the scores
    (`attention_over_fp32_scores`) and then as the pipeline has them now, all without LoRA
    dropout; then that path with the recipe's dropout on torch's masks and on `WordDropout`'s
    (now)."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from lkg_pipeline.core.llm import segments
    from lkg_pipeline.core.llm.lowrank import fold_lora
    from lkg_pipeline.core.llm.model import fuse_rms_norms
    from lkg_pipeline.core.llm.segments import segment_batch, segment_scores, use_segment_attention
    from lkg_pipeline.core.llm.train.config import lora_config
    from lkg_pipeline.core.llm.train.lora_dropout import use_word_dropout

    rows, answers = _segment_rows(tokenizer, prompts)

    def bf16_base(windowed: bool, fused_norms: bool = False) -> Any:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        if fused_norms:
            fuse_rms_norms(model)
        return use_segment_attention(model) if windowed else model

    def batch(row: Any, windowed: bool) -> dict[str, torch.Tensor]:
        out = segment_batch([row], 0)
        return out if windowed else {k: v for k, v in out.items() if not k.startswith("segment_")}

    def timed(configs: dict[str, Any]) -> dict[str, float]:
        medians, _ = taking_turns(configs, rows)
        return {name: round(m, 4) for name, m in medians.items()}

    out: dict[str, Any] = {"prompts": len(rows) - 1, "adapter": str(adapter)}
    # (model, attention): "dense" (the T×T block mask on SDPA), "kernel" (the windows on
    # torch's SDPA kernel) or "matmul" (the windows as `segments.grouped_attention`)
    ranking: dict[str, tuple[Any, str]] = {}
    if adapter is not None:
        ranking["dense + peft branch (before)"] = (
            PeftModel.from_pretrained(bf16_base(False), adapter, autocast_adapter_dtype=True),
            "dense",
        )
        ranking["windowed + peft branch"] = (
            PeftModel.from_pretrained(bf16_base(True), adapter, autocast_adapter_dtype=True),
            "kernel",
        )
        ranking["windowed + folded"] = (
            fold_lora(
                PeftModel.from_pretrained(bf16_base(True), adapter, autocast_adapter_dtype=True)
            ),
            "kernel",
        )
        ranker = load_ranker(base, adapter, "cpu", torch.bfloat16)
        ranking["windowed + folded + fused norms"] = (ranker, "kernel")
        ranking["windowed + folded + fused norms + matmul attention (now)"] = (ranker, "matmul")
    ranking["base model, dense"] = (bf16_base(False), "dense")
    ranking["base model, windowed"] = (bf16_base(True), "kernel")
    ranking["base model, windowed + fused norms"] = (bf16_base(True, True), "kernel")

    def scorer(model: Any, attention: str) -> Any:
        model.eval()
        on_kernel = attention != "matmul"

        def step(row: Any) -> None:
            with torch.inference_mode(), contextlib.ExitStack() as stack:
                if on_kernel:
                    stack.enter_context(
                        mock.patch.object(segments, "grouped_attention_pays", lambda *_: False)
                    )
                segment_scores(model, batch(row, attention != "dense"), answers)

        return step

    out["ranking_s_per_prompt"] = timed({k: scorer(*v) for k, v in ranking.items()})
    del ranking

    def trainer(
        autocast: bool,
        fused_norms: bool = False,
        kernel_backward: bool = False,
        dropout: str | None = None,
        fp32_scores: bool = False,
    ) -> Any:
        """A training step; `dropout`: None (none), "torch" (peft's nn.Dropout) or "word"
        (`lora_dropout.WordDropout`, as training swaps it in), at the recipe's rate;
        `fp32_scores`: the matmul attention as it was first (`attention_over_fp32_scores`)."""
        torch.manual_seed(0)
        rate = EVERY_LAYER_RECIPE.lora_dropout if dropout else 0.0
        config = dataclasses.replace(EVERY_LAYER_RECIPE, lora_dropout=rate)
        model = get_peft_model(
            bf16_base(True, fused_norms), lora_config(config), autocast_adapter_dtype=True
        )
        if dropout == "word":
            use_word_dropout(model)
        model.train()

        def step(row: Any) -> None:
            with contextlib.ExitStack() as stack:
                if kernel_backward:  # every attention block on torch's SDPA kernel
                    stack.enter_context(
                        mock.patch.object(segments, "grouped_attention_pays", lambda *_: False)
                    )
                if fp32_scores:
                    stack.enter_context(
                        mock.patch.object(segments, "grouped_attention", attention_over_fp32_scores)
                    )
                stack.enter_context(training_precision(model, torch.bfloat16 if autocast else None))
                scores = segment_scores(model, batch(row, True), answers)
            torch.nn.functional.cross_entropy(scores, torch.tensor([0])).backward()
            model.zero_grad()

        return step

    out["training_s_per_prompt"] = timed(
        {
            "windowed + peft fp32 branch (before)": trainer(False, kernel_backward=True),
            "windowed + autocast": trainer(True, kernel_backward=True),
            "windowed + autocast + fused norms": trainer(True, True, kernel_backward=True),
            "windowed + autocast + fused norms + matmul attention, fp32 score passes": trainer(
                True, True, fp32_scores=True
            ),
            "windowed + autocast + fused norms + matmul attention (now)": trainer(True, True),
            "now, LoRA dropout on torch's masks": trainer(True, True, dropout="torch"),
            "now, LoRA dropout on word masks (now)": trainer(True, True, dropout="word"),
        }
    )
    print(f"ablation: {out}", flush=True)
    return out


def attention_over_fp32_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    causal: bool = False,
) -> torch.Tensor:
    """`segments.grouped_attention`'s first version, kept for the ablation: the bf16 scores
    copied to fp32, then scaled, masked, soft-maxed and cast back in five passes over the
    score matrix where the pipeline's version makes two."""
    batch, heads, n_queries, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    stacked = query.reshape(batch, kv_heads, group * n_queries, dim)
    scores = torch.matmul(stacked, key.transpose(-1, -2)).view(
        batch, kv_heads, group, n_queries, n_keys
    )
    scores = scores.float().mul_(dim**-0.5 if scaling is None else scaling)
    if causal:
        above = torch.ones(n_queries, n_keys, dtype=torch.bool, device=query.device)
        scores = scores.masked_fill(above.triu_(n_keys - n_queries + 1), float("-inf"))
    if mask is not None:
        scores = scores + mask[:, :, None]
    weights = scores.softmax(-1).to(query.dtype)
    out = torch.matmul(weights.view(batch, kv_heads, group * n_queries, n_keys), value)
    return out.view(batch, heads, n_queries, dim).transpose(1, 2)


def inputs(lake: Path, row: Row) -> tuple[Path, Path | None]:
    """(prompts file, adapter or None) of `row`: the `make quality` run's where it ran, else
    the pipeline's own (`make run`: its `prompts` and `lora_adapter` for the variant, when
    they are in the row's format)."""
    prompts = prompts_file(lake, row.variant, row.format)
    adapter = lake / "quality" / row.name / "adapter"
    pipeline_prompts = layout.prompts_file(lake, DATASET, row.variant)
    if not prompts.exists() and pipeline_prompts.exists():
        has_segments = prompt_segments(pl.read_parquet(pipeline_prompts)) is not None
        if has_segments == (row.format == "segments"):
            prompts = pipeline_prompts
            adapter = layout.adapter_dir(lake, DATASET, row.variant)
    adapter = adapter if (adapter / "adapter_config.json").exists() else None
    return prompts, adapter if row.tuned else None


def linear_weights_per_layer(config: Any) -> int:
    """Weights of one decoder layer's linear projections (q, k, v, o; gate, up, down)."""
    hidden, inner = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return 2 * hidden * heads * head_dim + 2 * hidden * kv + 3 * hidden * inner


def gflop_per_token(config: Any, trained_layers: int | None = None) -> float:
    """GEMM work per token of the decoder's linear layers, the convention of model-FLOPs
    utilisation: 2 per weight for the forward (the LM head is not applied: scores read two of
    its rows); with `trained_layers` (LoRA on the top ones), 2 more per weight of the layers
    the backward goes through (input gradients only: the base is frozen; LoRA's own weights
    are under 2% and gradient checkpointing's recomputation is not useful work). Attention's
    score products are left out, so a fraction of the ceiling is a lower bound."""
    per_layer = linear_weights_per_layer(config)
    layers = config.num_hidden_layers
    flops = 2 * per_layer * layers
    if trained_layers is not None:
        flops += 2 * per_layer * min(trained_layers, layers)
    return flops / 1e9


def fractions_of_ceiling(
    section: dict[str, Any], config: Any, trained_layers: dict[str, int]
) -> dict[str, Any]:
    """Each measured LLM rate as a share of its own dtype's best GEMM rate on the model's
    shapes (`ceilings`): how far the stage is from running its GEMMs flat out. Derived from
    the section's own figures, so it applies to a section measured before it existed.
    `trained_layers` maps a training key of the section to the layers its recipe trains."""
    out: dict[str, Any] = {"gflop_per_token": {"ranking": gflop_per_token(config)}}
    for key, layers in trained_layers.items():
        out["gflop_per_token"][key] = gflop_per_token(config, layers)
    for dtype in DTYPES:
        ceiling = max(shape[f"{dtype}_gflops"] for shape in section["ceilings"].values())
        rates = section.get(dtype, {})
        row = {"ceiling_gflops": ceiling}
        if "ranking_tokens_per_s" in rates:
            row["ranking"] = rates["ranking_tokens_per_s"] * gflop_per_token(config) / ceiling
        for key, layers in trained_layers.items():
            if key in rates:
                row[key] = rates[key] * gflop_per_token(config, layers) / ceiling
        out[dtype] = {k: round(v, 3) for k, v in row.items()}
    out["ranking_fraction_of_ceiling"] = {d: out[d].get("ranking") for d in DTYPES}
    out["training_fraction_of_ceiling"] = {d: out[d].get("training_tokens_per_s") for d in DTYPES}
    return out


def trained_layers_of(config: Any, pipeline: TrainConfig) -> dict[str, int]:
    """The layers each training figure's recipe puts LoRA on (None in a recipe: all)."""
    every = EVERY_LAYER_RECIPE.lora_layers or config.num_hidden_layers
    return {
        "training_tokens_per_s": every,
        "training_tokens_per_s_no_dropout": every,
        "pipeline_training_tokens_per_s": pipeline.lora_layers or config.num_hidden_layers,
    }


def pipeline_recipe() -> TrainConfig:
    """`lora_adapter`'s default training settings as a TrainConfig."""
    from lkg_pipeline.defs.llm import LoraRunConfig

    return LoraRunConfig().to_core()


def run(
    n_prompts: int | None, row: Row, train_steps: int, ablation_prompts: int = 0
) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    lake = lake_root()
    base = base_model(lake)
    config = AutoConfig.from_pretrained(base)
    auto = choose_dtype("auto", "cpu", model_gemm_shape(config))
    source, adapter = inputs(lake, row)
    prompts = pl.read_parquet(source).filter(
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
        "prompts": {
            "row": row.name,
            "file": str(source),
            "adapter": str(adapter),
            "n": prompts.height,
        },
    }
    for dtype in DTYPES:
        # the attention path `rankings` takes for this dtype here (the probe's choice)
        _, attention = choose_paths(base, dtype, "auto", "cpu")
        model = load_ranker(base, adapter, "cpu", getattr(torch, dtype), attention.chosen)
        rank_prompts(model, tokenizer, prompts.head(2))  # warm-up: kernels, allocator
        tick = time.perf_counter()
        ranked[dtype] = rank_prompts(model, tokenizer, prompts)
        seconds = time.perf_counter() - tick
        ranks = ranked[dtype]["target_rank"].cast(pl.Float64).to_numpy()
        section[dtype] = {
            "attention": attention.chosen,
            "ranking_prompts_per_s": prompts.height / seconds,
            "ranking_tokens_per_s": float(prompts["n_tokens"].sum()) / seconds,
            "ndcg10": ranking_metrics(ranks, (10,))["NDCG@10"],
        }
        print(f"{dtype}: {section[dtype]}", flush=True)
        del model
    # the recipe in each dtype, then bf16 without LoRA dropout (the pipeline's default, as
    # dropout's mask and multiply cost a quarter of a CPU training step),
    # then the pipeline's own recipe (`lora_adapter`'s defaults: no dropout, LoRA in the top
    # layers only) in each dtype
    pipeline = pipeline_recipe()
    for dtype, recipe, key in (
        ("float32", EVERY_LAYER_RECIPE, "training_tokens_per_s"),
        ("bfloat16", EVERY_LAYER_RECIPE, "training_tokens_per_s"),
        (
            "bfloat16",
            dataclasses.replace(EVERY_LAYER_RECIPE, lora_dropout=0.0),
            "training_tokens_per_s_no_dropout",
        ),
        ("float32", pipeline, "pipeline_training_tokens_per_s"),
        ("bfloat16", pipeline, "pipeline_training_tokens_per_s"),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            probe = dataclasses.replace(
                recipe,
                dtype=dtype,
                max_steps=train_steps,
                grad_accum=4,
                max_val_examples=1,
                eval_every=10_000,
                checkpoint_every=10_000,
                log_every=1,
            )
            result = training_function(probe, RunPaths(source, base, Path(tmp) / "a"), resume=False)
            section[dtype][key] = result.summary["tokens_per_s"]
        print(f"{dtype} {key}: {section[dtype][key]:.0f}", flush=True)
    if ablation_prompts:
        section["ablation"] = ablation(base, adapter, prompts.head(ablation_prompts + 1), tokenizer)
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
        pipeline_recipe={
            "lora_dropout": pipeline.lora_dropout,
            "lora_layers": pipeline.lora_layers,
        },
        pipeline_training_speedup_vs_fp32=section["bfloat16"]["pipeline_training_tokens_per_s"]
        / section["float32"]["pipeline_training_tokens_per_s"],
        # the pipeline's training now against the quality recipe in fp32 (every layer, dropout)
        pipeline_training_speedup_vs_recipe_fp32=section["bfloat16"][
            "pipeline_training_tokens_per_s"
        ]
        / section["float32"]["training_tokens_per_s"],
        fraction_of_ceiling=fractions_of_ceiling(
            section, config, trained_layers_of(config, pipeline)
        ),
        top1_agreement=float(np.mean(top)),
        ndcg10_fp32=section["float32"]["ndcg10"],
        ndcg10_bf16=section["bfloat16"]["ndcg10"],
    )
    return section


def derive_fractions(name: str) -> int:
    """Add `fraction_of_ceiling` to a stored section (measured before the field existed)."""
    from transformers import AutoConfig

    section = json.loads(RESULTS_JSON.read_text())[name]
    config = AutoConfig.from_pretrained(base_model(lake_root()))
    layers = trained_layers_of(config, pipeline_recipe())
    section["fraction_of_ceiling"] = fractions_of_ceiling(section, config, layers)
    save_results_section(RESULTS_JSON, name, section)
    print(json.dumps(section["fraction_of_ceiling"], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm.dtype")
    parser.add_argument("--prompts", type=int, default=None, help="test prompts (default: all)")
    parser.add_argument(
        "--row", default="lkg_rag-segments-tuned", help="a benchmarks.quality.rankers row"
    )
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument(
        "--ablation-prompts", type=int, default=12, help="prompts per ablation (0: none)"
    )
    parser.add_argument(
        "--derive-fractions",
        action="store_true",
        help="only add fraction_of_ceiling to the stored --section from its own figures",
    )
    parser.add_argument(
        "--section",
        default="llm_dtype",
        help="results.json section to write (another name keeps a second machine's run beside)",
    )
    args = parser.parse_args(argv)
    if args.derive_fractions:
        return derive_fractions(args.section)
    torch.set_num_threads(2)
    variant, fmt, kind = args.row.split("-")
    section = run(
        args.prompts, Row(variant, fmt, kind == "tuned"), args.train_steps, args.ablation_prompts
    )
    save_results_section(RESULTS_JSON, args.section, section)
    keys = ("chosen_dtype", "ranking_speedup_vs_fp32", "training_speedup_vs_fp32",
            "no_dropout_training_speedup", "pipeline_training_speedup_vs_fp32",
            "pipeline_training_speedup_vs_recipe_fp32", "top1_agreement", "ndcg10_fp32",
            "ndcg10_bf16")  # fmt: skip
    print(json.dumps({k: section[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
