"""`make bench-levers`: where the bf16 ranking forward spends its time on this machine, and what
two levers beyond the pipeline's path buy there: torch.compile and int8 weights.

    python -m benchmarks.llm.levers                  # 40 test prompts, ~8 min on 2 cores
    python -m benchmarks.llm.levers --quick          # 6 prompts, nothing saved

One process, nothing else running, on the real ml-100k test prompts whose true item is a
candidate (the prompts and adapter of `make bench-dtype`), inductor's caches in a fresh folder
(every compile is timed cold):

1. Profiles: torch.profiler's self time by op family of a bf16 ranking forward (`rankings`'
   path: folded adapter, fused norms, windowed attention on the path the probe chooses here;
   then on the other path), with the rate its linear GEMMs reach against the GEMM ceiling of
   the model's own shapes, and of
   `lora_adapter`'s bf16 training step. The time outside the linear GEMMs bounds what any
   fusion or compiler can take.
2. torch.compile (inductor) on the decoder MLPs without an adapter (the pipeline's adapter
   is in the top layers), the largest block of element-wise work (SiLU, the gate product,
   their copies): first one MLP at one prompt's length, eager against
   compiled (default, frozen weights, frozen + max-autotune's GEMM templates); then end to end,
   every MLP compiled once per bucket of prompt lengths (the rows padded to a multiple of
   `BUCKET`: an MLP is row-wise, so padding changes nothing), taking turns with eager on
   the same prompts, the compile time counted.
3. int8: torch's dynamic quantization (int8 weights per output channel, activations quantized
   per call; VNNI/AMX-int8 kernels) of the fp32 ranker's decoder linears, every one or all but
   the MLP down-projections, whose inputs carry outliers thousands of times their mean (the
   ratio is reported); its speed beside fp32 and bf16 and its top-1 agreement with fp32, the
   quality guard `make bench-dtype` applies to bf16. Which rounding costs the order, by fake
   quantisation (weights alone, activations per token or per call); and one GEMM with int8
   weights alone (bf16 activations) against bf16.

None of the levers is in the pipeline; the section says, per machine, whether one would pay
(benchmarks/README.md#what-is-left-in-the-bf16-forward). Writes `llm_levers` in results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from benchmarks.harness import (
    RESULTS_JSON,
    lake_root,
    machine_info,
    save_results_section,
    taking_turns,
)
from benchmarks.llm.dtype import ceilings, gflop_per_token, inputs
from benchmarks.quality.rankers import Row, base_model
from lkg_pipeline.core.evaluate.metrics import rank_of_target, ranking_metrics
from lkg_pipeline.core.llm.probes import cpu_flags, cpu_model
from lkg_pipeline.core.llm.rank.job import choose_paths
from lkg_pipeline.core.llm.rank.scoring import load_ranker, prompt_segments
from lkg_pipeline.core.llm.segments import (
    answer_token_ids,
    segment_batch,
    segment_scores,
    tokenize_segments,
)

BUCKET = 64  # rows of a compiled MLP call are padded to a multiple of this
# Self time of these ops is the linear layers' GEMMs, of these the attention's score products
LINEAR_OPS = ("aten::mm", "aten::addmm", "quantized::linear_dynamic")
ATTENTION_OPS = ("aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def op_families(self_ms: dict[str, float]) -> dict[str, float]:
    """Milliseconds by family from {op name: self time}: linear GEMMs, attention products,
    softmax, and the rest (element-wise kernels, copies, concatenation, dispatch)."""
    out = {"linear_gemms": 0.0, "attention_products": 0.0, "softmax": 0.0, "other": 0.0}
    for name, ms in self_ms.items():
        if name in LINEAR_OPS:
            out["linear_gemms"] += ms
        elif name in ATTENTION_OPS:
            out["attention_products"] += ms
        elif name in ("aten::_softmax", "aten::softmax"):
            out["softmax"] += ms
        else:
            out["other"] += ms
    return out


def profile_forward(model: Any, rows: list[Any], answers: tuple[int, int]) -> dict[str, Any]:
    """Self time by op family over `rows` (one forward each), and the ten costliest ops."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        tick = time.perf_counter()
        for row in rows:
            segment_scores(model, segment_batch([row], 0), answers)
        wall = time.perf_counter() - tick
    return {
        "prompts": len(rows),
        "wall_s_per_prompt": wall / len(rows),
        **by_family(prof, len(rows)),
    }


def by_family(prof: Any, n_prompts: int) -> dict[str, Any]:
    """A profile's self time per prompt by op family (`op_families`), each family's share,
    and the ten costliest ops. The profiler's self times are microseconds; wrappers
    (aten::matmul, aten::linear) hold none of their kernels' time, so the families sum to
    the whole of what was profiled."""
    self_ms = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    families = op_families(self_ms)
    total = sum(families.values())
    top = sorted(self_ms.items(), key=lambda kv: -kv[1])[:10]
    return {
        "ms_per_prompt": {k: round(v / n_prompts, 1) for k, v in families.items()},
        "share": {k: round(v / total, 3) for k, v in families.items()},
        "top_ops_ms_per_prompt": {k: round(v / n_prompts, 1) for k, v in top},
    }


def profile_training(base: Path, rows: list[Any], answers: tuple[int, int]) -> dict[str, Any]:
    """`profile_forward` for `lora_adapter`'s training step (its default recipe in bf16:
    autocast over the bf16 base, fused norms, attention on the path the probe picks for a
    backward, word-mask LoRA dropout, AdamW every `grad_accum` prompts), over `rows` after
    one untimed step; with the tokens/s and the GEMM work that rate does per second."""
    from peft import get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from benchmarks.llm.dtype import pipeline_recipe, training_precision
    from lkg_pipeline.core.llm.model import fuse_rms_norms
    from lkg_pipeline.core.llm.segments import choose_attention, use_segment_attention
    from lkg_pipeline.core.llm.train.config import lora_config
    from lkg_pipeline.core.llm.train.lora_dropout import use_word_dropout

    recipe = pipeline_recipe()
    torch.manual_seed(recipe.seed)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = base_model.config
    attention = choose_attention(recipe.attention, torch.bfloat16, "cpu", config, backward=True)
    use_segment_attention(base_model, attention.chosen)
    fuse_rms_norms(base_model)
    model = get_peft_model(
        base_model, lora_config(recipe, config.num_hidden_layers), autocast_adapter_dtype=True
    )
    use_word_dropout(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr)

    def step(i: int, row: Any) -> None:
        with training_precision(model, torch.bfloat16):
            scores = segment_scores(model, segment_batch([row], 0), answers)
        F.cross_entropy(scores, torch.tensor([0])).backward()
        if (i + 1) % recipe.grad_accum == 0:
            optimizer.step()
            optimizer.zero_grad()

    step(-1, rows[0])
    optimizer.zero_grad()
    timed = rows[1:]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tick = time.perf_counter()
        for i, row in enumerate(timed):
            step(i, row)
        wall = time.perf_counter() - tick
    tokens = sum(r.n_tokens for r in timed)
    layers = recipe.lora_layers or config.num_hidden_layers
    return {
        "prompts": len(timed),
        "attention": attention.chosen,
        "recipe": {"lora_layers": layers, "target_modules": list(recipe.target_modules)},
        "tokens_per_s_profiled": round(tokens / wall, 1),
        "achieved_gemm_gflops": round(tokens / wall * gflop_per_token(config, layers), 1),
        **by_family(prof, len(timed)),
    }


def mlp_weights(mlp: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(gate, up, down) weights of a plain SiLU-gated MLP (no bias, no adapter), else None."""
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(p) is torch.nn.Linear and p.bias is None for p in parts):
        return None
    from transformers.activations import SiLUActivation

    if not isinstance(getattr(mlp, "act_fn", None), torch.nn.SiLU | SiLUActivation):
        return None
    return parts[0].weight, parts[1].weight, parts[2].weight


def gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> Any:
    """A Llama MLP as a function of its weights: one compiled graph serves every layer."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def compile_mlps(model: Any, bucket: int = BUCKET) -> Callable[[int], float]:
    """Make every plain MLP of `model` run `gated_mlp` compiled (static shapes: one compile
    per bucket of rows, shared by all layers), its rows padded to a multiple of `bucket`.
    Returns `warm(rows) -> seconds`: compiles the bucket of `rows` ahead, saying what it took."""
    compiled = torch.compile(gated_mlp, dynamic=False)
    mlps = [m for m in model.modules() if mlp_weights(m) is not None]
    assert mlps, "the model has no plain SiLU-gated MLP to compile"

    def forward_of(weights: tuple[torch.Tensor, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[-2]
            return compiled(F.pad(x, (0, 0, 0, -n % bucket)), *weights)[..., :n, :]

        return forward

    for mlp in mlps:
        weights = mlp_weights(mlp)
        assert weights is not None
        mlp.forward = forward_of(weights)

    def warm(rows: int) -> float:
        first = mlps[0].gate_proj
        x = torch.zeros(1, rows, first.in_features, dtype=first.weight.dtype)
        tick = time.perf_counter()
        with torch.inference_mode():
            mlps[0](x)
        return time.perf_counter() - tick

    return warm


def mlp_micro(model: Any, rows: int, quick: bool, rounds: int = 2) -> dict[str, Any]:
    """One decoder MLP at `rows` rows: eager against inductor's variants, each the best of
    20 calls in its best of `rounds` rounds (eager timed in every round too: the machine's
    speed drifts), and its first round's compile seconds. Frozen weights
    are inductor's `freezing` (constants it may pre-pack); max-autotune adds its C++ GEMM
    templates (AMX where the CPU has it)."""
    import torch._dynamo
    import torch._inductor.config as inductor

    mlp = next(m for m in model.modules() if mlp_weights(m) is not None)
    width = mlp.gate_proj.in_features
    x = torch.randn(1, rows, width, generator=torch.Generator().manual_seed(0)).to(
        mlp.gate_proj.weight.dtype
    )

    def best_ms(f: Callable[[torch.Tensor], torch.Tensor]) -> float:
        best = float("inf")
        for _ in range(20):
            tick = time.perf_counter()
            f(x)
            best = min(best, time.perf_counter() - tick)
        return best * 1e3

    variants: dict[str, dict[str, Any]] = {
        "compiled": {},
        "compiled, frozen weights": {"freezing": True},
    }
    if not quick:
        variants["compiled, frozen + max-autotune"] = {
            "freezing": True,
            "max_autotune": True,
            "max_autotune_gemm_backends": "CPP,ATEN",
        }
    ms: dict[str, float] = {"eager": float("inf"), "gate GEMM alone": float("inf")}
    out: dict[str, Any] = {"rows": rows, "compile_s": {}, "max_rel_diff": {}}
    with torch.inference_mode():
        reference = mlp(x).float()
        for round_ in range(rounds):
            ms["eager"] = min(ms["eager"], best_ms(mlp))
            ms["gate GEMM alone"] = min(ms["gate GEMM alone"], best_ms(mlp.gate_proj))
            for name, settings in variants.items():
                torch._dynamo.reset()  # the variants share one code object's cache
                with inductor.patch(settings):
                    fn = torch.compile(mlp)
                    tick = time.perf_counter()
                    got = fn(x).float()
                    if not round_:
                        out["compile_s"][name] = round(time.perf_counter() - tick, 1)
                        diff = (got - reference).abs().max() / reference.abs().max()
                        out["max_rel_diff"][name] = float(diff)
                    ms[name] = min(ms.get(name, float("inf")), best_ms(fn))
        torch._dynamo.reset()
    out["ms"] = {k: round(v, 2) for k, v in ms.items()}
    return out


def weight_only_int8_gemm(model: Any, rows: int) -> dict[str, float]:
    """One MLP up-projection at `rows` rows, bf16 weights against int8 weights per output
    channel (torch's weight-only kernel, `_weight_int8pack_mm`: bf16 inputs, the weights
    widened in the kernel), best of 30 calls each in the better of two rounds."""
    mlp = next(m for m in model.modules() if mlp_weights(m) is not None)
    weight = mlp.up_proj.weight.detach()  # (out, in), bf16
    scale = weight.float().abs().amax(1).clamp(min=1e-12) / 127
    packed = (weight.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(weight.dtype)
    calls = {
        "bf16_ms": lambda: F.linear(x, weight),
        "int8_weights_ms": lambda: torch._weight_int8pack_mm(x, packed, scale.to(x.dtype)),
    }
    best = {name: float("inf") for name in calls}
    with torch.inference_mode():
        for _ in range(2):
            for name, call in calls.items():
                for _ in range(30):
                    tick = time.perf_counter()
                    call()
                    best[name] = min(best[name], time.perf_counter() - tick)
    return {"rows": rows, **{name: round(s * 1e3, 2) for name, s in best.items()}}


def down_proj_outliers(model: Any, row: Any) -> float:
    """Largest |input| over mean |input| of any MLP down-projection on one prompt: what a
    per-call int8 scale of its activations must span."""
    worst = 0.0

    def hook(_module: Any, args: tuple[torch.Tensor, ...], _out: Any) -> None:
        nonlocal worst
        x = args[0].abs().float()
        worst = max(worst, float(x.max() / x.mean()))

    handles = [
        m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("down_proj")
    ]
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([row.prefix + sum(row.segments, [])]))
    finally:
        for h in handles:
            h.remove()
    return worst


def int8_ranker(fp32_ranker: Any, skip_down_proj: bool) -> Any:
    """A copy of the fp32 ranker with its decoder's linear layers dynamically quantized to int8
    (weights per output channel); the head stays fp32 (scores read two of its rows)."""
    import copy

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = copy.deepcopy(fp32_ranker)
    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not (skip_down_proj and name.endswith("down_proj"))
    }
    model.model = quantize_dynamic(model.model, spec, dtype=torch.qint8)
    return model


def fake_int8(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """`x` rounded to symmetric int8 with one scale per slice reduced over `dim` (the max
    magnitude maps to 127), returned in its own dtype: int8's rounding without its kernels."""
    scale = x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / 127
    return (x / scale).round().clamp(-127, 127) * scale


# What each fake-quantised configuration rounds: weights per output channel, and the
# activations entering each linear layer per token or per call (per tensor)
INT8_ROUNDINGS = {
    "weights per channel only": (True, None, False),
    "weights + activations per token": (True, "token", False),
    "weights + activations per token, down_proj kept": (True, "token", True),
    "weights + activations per tensor": (True, "tensor", False),
}


def int8_rounding_quality(
    fp32_ranker: Any, rows: list[Any], answers: tuple[int, int], reference: torch.Tensor
) -> dict[str, Any]:
    """Which int8 rounding costs the ranking its order: the fp32 ranker's decoder linears
    with int8-rounded weights and/or inputs (`fake_int8`, in fp32 arithmetic), each scored
    against `reference` (the fp32 scores of `rows`). Depends on the model, not the machine:
    int8 kernels (VNNI, AMX) compute these roundings exactly, accumulating in int32. The
    agreement, top-1 and rank correlation, is with fp32 as in `quality`."""
    linears = [
        (name, module)
        for name, module in fp32_ranker.model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    originals = {name: module.weight.data for name, module in linears}
    out: dict[str, Any] = {}
    for label, (weights, activations, keep_down) in INT8_ROUNDINGS.items():
        hooks = []
        for name, module in linears:
            if keep_down and name.endswith("down_proj"):
                continue
            if weights:
                module.weight.data = fake_int8(originals[name], dim=1)
            if activations is not None:
                dim = -1 if activations == "token" else None

                def hook(_m: Any, args: tuple[torch.Tensor, ...], dim: Any = dim) -> tuple:
                    x = args[0]
                    return (fake_int8(x, tuple(range(x.dim())) if dim is None else dim),)

                hooks.append(module.register_forward_pre_hook(hook))
        try:
            scores = torch.cat([scorer(fp32_ranker, answers)(row) for row in rows])
        finally:
            for h in hooks:
                h.remove()
            for name, module in linears:
                module.weight.data = originals[name]
        out[label] = agreement(scores, reference)
        print(f"int8 rounding, {label}: {out[label]}", flush=True)
    return out


def scorer(model: Any, answers: tuple[int, int]) -> Callable[[Any], torch.Tensor]:
    model.eval()

    def step(row: Any) -> torch.Tensor:
        with torch.inference_mode():
            return segment_scores(model, segment_batch([row], 0), answers).float()

    return step


def agreement(scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far (N, C) `scores` keep the order of `reference`: the share of prompts with the
    same top candidate, and the mean over prompts of the rank correlation (Spearman) of the
    C candidates' scores."""

    def centred_ranks(s: torch.Tensor) -> torch.Tensor:
        ranks = s.argsort(1).argsort(1).double()
        return ranks - ranks.mean(1, keepdim=True)

    a, b = centred_ranks(scores), centred_ranks(reference)
    correlation = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    top1 = (scores.argmax(1) == reference.argmax(1)).double().mean()
    return {
        "top1_agreement": round(float(top1), 3),
        "rank_correlation": round(float(correlation.mean()), 3),
    }


def quality(scores: dict[str, torch.Tensor], target: torch.Tensor, reference: str) -> dict:
    """NDCG@10 of each configuration's scores and its `agreement` with `reference`'s."""
    out = {}
    for name, s in scores.items():
        ranks = rank_of_target(s, target, tie_break="index").double().numpy()
        ndcg = ranking_metrics(ranks, (10,))["NDCG@10"]
        out[name] = {"ndcg10": round(ndcg, 4), **agreement(s, scores[reference])}
    return out


def measure(
    base: Path, adapter: Path | None, prompts: pl.DataFrame, tokenizer: Any, quick: bool = False
) -> dict[str, Any]:
    """Every part of the module docstring on `prompts` (segments format)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    segments = prompt_segments(prompts)
    assert segments is not None, "the levers are measured on the segments format"
    rows = [tokenize_segments(tokenizer, p, s) for p, s in zip(prompts["prompt"], segments)]
    answers = answer_token_ids(tokenizer, segments[0][0])
    target = torch.tensor(prompts["target_index"].to_list()).clamp(min=0)
    tokens = [r.n_tokens for r in rows]
    out: dict[str, Any] = {"prompts": len(rows), "tokens_per_prompt": float(np.mean(tokens))}

    # the attention path `rankings` takes here (the probe's choice), and the other one profiled too
    _, choice = choose_paths(base, "bfloat16", "auto", "cpu")
    out["attention"] = choice.metadata()
    bf16 = load_ranker(base, adapter, "cpu", torch.bfloat16, choice.chosen)
    if not any(mlp_weights(m) is not None for m in bf16.modules()):
        raise ValueError(
            f"no decoder MLP of {base} with {adapter} is a plain SiLU-gated one, the only kind "
            "the compile lever replaces: the adapter adapts every layer's MLP (the pipeline's "
            "adapts the top layers only)"
        )
    ceiling = max(s["bfloat16_gflops"] for s in ceilings(config).values())
    profiled_rows = rows[1 : 1 + min(10, len(rows) - 1)]
    gflop = gflop_per_token(config) * float(np.mean([r.n_tokens for r in profiled_rows]))
    other = "matmul" if choice.chosen == "kernel" else "kernel"
    for key, path in (("profile_bf16", choice.chosen), ("profile_bf16_other_attention", other)):
        model = (
            bf16
            if path == choice.chosen
            else load_ranker(base, adapter, "cpu", torch.bfloat16, path)
        )
        scorer(model, answers)(rows[0])  # warm-up: kernels, allocator
        profiled = {"attention": path, **profile_forward(model, profiled_rows, answers)}
        gemm_s = profiled["ms_per_prompt"]["linear_gemms"] / 1e3
        profiled["linear_gemm_gflops"] = round(gflop / gemm_s, 1) if gemm_s else None
        profiled["bf16_ceiling_gflops"] = ceiling
        out[key] = profiled
        print(f"{key}: {json.dumps(profiled)}", flush=True)
    out["profile_training_bf16"] = profile_training(
        base, rows[: 1 + min(8, len(rows) - 1)], answers
    )
    print(f"training profile: {json.dumps(out['profile_training_bf16'])}", flush=True)
    out["compile_mlp_micro"] = mlp_micro(bf16, int(np.median(tokens)), quick)
    print(f"compile, one MLP: {out['compile_mlp_micro']}", flush=True)
    out["int8_weight_only_gemm"] = weight_only_int8_gemm(bf16, int(np.median(tokens)))
    print(f"int8 weights only, one GEMM: {out['int8_weight_only_gemm']}", flush=True)
    compiled_bf16 = load_ranker(base, adapter, "cpu", torch.bfloat16, choice.chosen)
    warm = compile_mlps(compiled_bf16)
    buckets = sorted({-(-t // BUCKET) * BUCKET for t in tokens})
    compile_s = sum(warm(b) for b in buckets)
    fp32 = load_ranker(base, adapter, "cpu", torch.float32)
    configs = {"fp32": scorer(fp32, answers), "bf16 (now)": scorer(bf16, answers)}
    out["int8_down_proj_outlier_ratio"] = round(down_proj_outliers(fp32, rows[0]), 1)
    for name, skip in (("int8, all but down_proj", True), ("int8, every linear", False)):
        configs[name] = scorer(int8_ranker(fp32, skip), answers)
    configs["bf16 + compiled MLPs"] = scorer(compiled_bf16, answers)
    medians, returned = taking_turns(configs, rows)
    scores = {name: torch.cat(s) for name, s in returned.items()}
    out["s_per_prompt"] = {k: round(v, 4) for k, v in medians.items()}
    out["speed_vs_bf16_now"] = {k: round(medians["bf16 (now)"] / v, 3) for k, v in medians.items()}
    out["quality"] = quality(scores, target[: len(rows)], "fp32")
    out["int8_rounding"] = int8_rounding_quality(fp32, rows, answers, scores["fp32"])
    out["compile"] = {
        "buckets": len(buckets),
        "bucket_tokens": BUCKET,
        "compile_s": round(compile_s, 1),
        "saved_s_per_prompt": round(medians["bf16 (now)"] - medians["bf16 + compiled MLPs"], 4),
    }
    saved = out["compile"]["saved_s_per_prompt"]
    out["compile"]["break_even_prompts"] = round(compile_s / saved) if saved > 0 else None
    return out


def run(n_prompts: int, row: Row, quick: bool = False) -> dict[str, Any]:
    from transformers import AutoTokenizer

    lake = lake_root()
    base = base_model(lake)
    source, adapter = inputs(lake, row)
    prompts = pl.read_parquet(source).filter(
        (pl.col("split") == "test") & (pl.col("target_index") >= 0)
    )
    prompts = prompts.head(n_prompts)
    section: dict[str, Any] = {
        "machine": machine_info(),
        "cpu_model": cpu_model(),
        "machine_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "inputs": {"row": row.name, "file": str(source), "adapter": str(adapter)},
    }
    section.update(measure(base, adapter, prompts, AutoTokenizer.from_pretrained(base), quick))
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm.levers")
    parser.add_argument("--prompts", type=int, default=40, help="test prompts (default 40)")
    parser.add_argument(
        "--row", default="lkg_rag-segments-tuned", help="a benchmarks.quality.rankers row"
    )
    parser.add_argument(
        "--section",
        default="llm_levers",
        help="results.json section to write (another name keeps a second machine's run beside)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="6 prompts, no max-autotune, nothing saved"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    variant, fmt, kind = args.row.split("-")
    with tempfile.TemporaryDirectory() as cache:
        # inductor's caches in a fresh folder: every compile is timed cold, as on a fresh machine
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        row = Row(variant, fmt, kind == "tuned")
        section = run(6 if args.quick else args.prompts, row, args.quick)
    if not args.quick:
        save_results_section(RESULTS_JSON, args.section, section)
    keys = ("s_per_prompt", "speed_vs_bf16_now", "quality", "compile")
    print(json.dumps({k: section[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
