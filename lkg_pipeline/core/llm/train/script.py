"""The command line of LoRA fine-tuning: `python -m lkg_pipeline.core.llm.train`.

Training follows the shape of accelerate's `complete_nlp_example.py` (get_dataloaders in
`data.py` → training_function in `loop.py` → `main` here) so the same code runs as
`python -m lkg_pipeline.core.llm.train`, as `accelerate launch … -m lkg_pipeline.core.llm.train`,
in-process from tests, and under Dagster Pipes. It imports no Dagster: `dagster_pipes` (a
dependency-free client) is only touched in `main()`, and only on the main process (DESIGN.md §3:
a second rank opening the channel gives "Multiple materialize results").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lkg_pipeline.core.llm.precision import DTYPES
from lkg_pipeline.core.llm.segments import ATTENTION_PATHS
from lkg_pipeline.core.llm.train.config import (
    LOSSES,
    RunPaths,
    TrainConfig,
    TrainResult,
    make_accelerator,
)
from lkg_pipeline.core.llm.train.loop import training_function


def _field_parser(hint: Any) -> dict[str, Any]:
    """argparse options for a TrainConfig field's type."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:  # e.g. int | None
        inner = next(a for a in args if a is not type(None))

        def optional(text: str) -> Any:
            return None if text.lower() == "none" else inner(text)

        return {"type": optional, "metavar": f"{inner.__name__.upper()}|none"}
    if typing.get_origin(hint) is tuple:
        return {"type": args[0], "nargs": "+"}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": hint}


def build_parser() -> argparse.ArgumentParser:
    """Paths, --resume/--no-resume, and one option per TrainConfig field (same names, dashed)."""
    parser = argparse.ArgumentParser(
        prog="python -m lkg_pipeline.core.llm.train",
        description="LoRA-fine-tune a causal LM to rank 20 lettered candidates (LlamaRec).",
    )
    parser.add_argument("--prompts", type=Path, required=True, help="prompts Parquet file")
    parser.add_argument("--base-model", type=Path, required=True, help="HF checkpoint folder")
    parser.add_argument("--output", type=Path, required=True, help="adapter folder to publish")
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from OUTPUT.partial's latest checkpoint if there is one",
    )
    parser.add_argument(
        "--restart-other-run",
        action="store_true",
        help="with --resume: start over, instead of failing, when OUTPUT.partial was made "
        "from other prompts, base model or settings",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        options = _field_parser(hints[f.name])
        choices = (
            {"choices": {"loss": LOSSES, "dtype": DTYPES, "attention": ATTENTION_PATHS}[f.name]}
            if f.name in ("loss", "dtype", "attention")
            else {}
        )
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=f.default,
            help=f"default: {f.default}",
            **options,
            **choices,
        )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["target_modules"] = tuple(values["target_modules"])
    return TrainConfig(**values)


def pipes_metadata(result: TrainResult) -> dict[str, Any]:
    """Flat metadata for the asset materialisation: best val metrics, where, how fast."""
    s = result.summary
    return {
        "adapter": {"raw_value": str(result.output), "type": "path"},
        "best_step": result.best_step,
        "steps": result.step,
        "finished": result.finished,
        **{f"val_{k}": v for k, v in result.best_val.items()},
        "n_train": s["n_train"],
        "n_val": s["n_val"],
        "adapted_layers": s["adapted_layers"],
        "loss": s["config"]["loss"],
        "final_train_loss": next(
            (h["loss"] for h in reversed(result.history) if "loss" in h), None
        ),
        "wall_time_s": s["wall_time_s"],
        "tokens_per_s": s["tokens_per_s"],
        "peak_rss_mb": s["peak_rss_mb"],
        **s["precision"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    paths = RunPaths(args.prompts, args.base_model, args.output)
    accelerator = make_accelerator(config)
    # Every rank trains; only rank 0 may open the Pipes channel (DESIGN.md §3). dagster_pipes
    # 1.13 has no module-level is_dagster_pipes_process(): its env-var loader answers instead.
    under_pipes = PipesEnvVarParamsLoader().is_dagster_pipes_process()
    if accelerator.is_main_process and under_pipes:
        with open_dagster_pipes() as pipes:
            result = training_function(
                config,
                paths,
                args.resume,
                lambda r: pipes.log.info(json.dumps(r)),
                accelerator,
                args.restart_other_run,
            )
            pipes.report_asset_materialization(metadata=pipes_metadata(result))
    else:
        training_function(
            config,
            paths,
            args.resume,
            accelerator=accelerator,
            restart_other_run=args.restart_other_run,
        )
    return 0
