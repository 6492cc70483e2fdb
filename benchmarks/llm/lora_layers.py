"""How many of the top decoder layers LoRA needs: training speed against validation quality.

`lora_adapter`'s recipe (the run configuration's defaults) with LoRA in the top N decoder
layers for each N given (`all`: every layer), trained from the pipeline's own prompts and base
model (`make run`'s lake), each validated on the same `--val` validation prompts at step 0 and
at the end. Backward stops at the lowest adapted layer, so fewer layers train faster; the
question is what that costs on validation. Writes `lora_layers` in benchmarks/results.json.

    python -m benchmarks.llm.lora_layers    # 5 10 15 all, 300 val prompts (~30 min, 2 cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import RESULTS_JSON, lake_root, machine_info, save_results_section
from benchmarks.llm.dtype import pipeline_recipe
from lkg_pipeline.core.llm.train.config import RunPaths
from lkg_pipeline.core.llm.train.loop import training_function
from lkg_pipeline.defs.layout import current_base_model, prompts_file


def measure(
    prompts: Path, base: Path, layers: list[int | None], n_val: int
) -> list[dict[str, Any]]:
    """One training run per setting: tokens/s, wall time, peak RSS and the validations."""
    recipe = pipeline_recipe()
    rows = []
    for n in layers:
        config = dataclasses.replace(
            recipe, lora_layers=n, max_val_examples=n_val, eval_every=10_000
        )
        with tempfile.TemporaryDirectory() as tmp:
            tick = time.perf_counter()
            result = training_function(
                config, RunPaths(prompts, base, Path(tmp) / "a"), resume=False
            )
            wall = time.perf_counter() - tick
        val = [h["val"] for h in result.summary["history"] if "val" in h]
        rows.append(
            {
                "lora_layers": "all" if n is None else n,
                "tokens_per_s": result.summary["tokens_per_s"],
                "wall_s": wall,
                "peak_rss_mb": result.summary["peak_rss_mb"],
                "val_step0": val[0],
                "val_final": val[-1],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm.lora_layers")
    parser.add_argument("layers", nargs="*", default=["5", "10", "15", "all"])
    parser.add_argument("--val", type=int, default=300, help="validation prompts")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    layers = [None if n == "all" else int(n) for n in args.layers]
    lake = lake_root()
    rows = measure(
        prompts_file(lake, "ml-100k", "lkg_rag"), current_base_model(lake), layers, args.val
    )
    recipe = pipeline_recipe()
    section = {
        "machine": machine_info(),
        "recipe": {**dataclasses.asdict(recipe), "target_modules": list(recipe.target_modules)},
        "n_val": args.val,
        "rows": rows,
    }
    save_results_section(RESULTS_JSON, "lora_layers", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
