"""Rank a prompts file with the LLM, split across the processes `accelerate launch` starts.

`rankings` and `recommendations` run this script as `lora_adapter` runs `train_lora`: one
CPU process by default, several processes, GPUs or machines from an `accelerate config` file.
Each process loads the ranker on its own device and scores a contiguous share of the prompts
(`split_between_processes`); the shares are gathered in order on the main process, which alone
writes the table and reports through Dagster Pipes (progress lines, then the metadata). Every
prompt is scored exactly as `rank_prompts` scores it in one process: a prompt's scores do not
depend on which other prompts share its process.

    accelerate launch [--config_file F] -m lkg_pipeline.core.llm.rank \
        --prompts P.parquet --base-model DIR [--adapter DIR] --output OUT.parquet
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from lkg_pipeline.core.evaluate.metrics import ranking_metrics
from lkg_pipeline.core.io.storage import write_parquet_atomic
from lkg_pipeline.core.llm.precision import DTYPES, DtypeChoice, choose_dtype, model_gemm_shape
from lkg_pipeline.core.llm.rank.scoring import (
    RANKING_COLUMNS,
    ProgressLog,
    load_ranker,
    rank_prompts,
    trained_over,
)
from lkg_pipeline.core.llm.segments import ATTENTION_PATHS, AttentionChoice, choose_attention


@dataclass(frozen=True)
class RankJob:
    prompts: Path  # the prompts to rank (PROMPT_COLUMNS), in the order of the output
    base_model: Path
    adapter: Path | None  # None: the base model (zero-shot)
    output: Path  # the rankings (RANKING_COLUMNS), written by the main process only
    batch_size: int | None = None  # None: default_batch_size (1 on CPU, 16 on CUDA)
    dtype: str = "auto"  # core.llm.precision
    what: str = "rankings"  # how progress lines name the work
    attention: str = "auto"  # core.llm.segments.choose_attention


@dataclass(frozen=True)
class RankOutcome:
    table: pl.DataFrame | None  # every prompt's ranking on the main process; None elsewhere
    dtype: DtypeChoice
    attention: AttentionChoice
    retriever_prior: bool  # ranked by retriever log-prior + LLM (the adapter was trained so)
    processes: int
    device: str  # the main process's
    ranking_seconds: float  # the slowest process's time ranking its share


def prompts_to_rank(
    prompts: pl.DataFrame, splits: Sequence[str], scope: str, what: str
) -> pl.DataFrame:
    """The prompts of `splits` to rank: all of them, or (scope "subset") those whose true item
    is a candidate (the others are misses whatever the LLM does)."""
    unknown = set(splits) - {"val", "test"}
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; choose from 'val', 'test'")
    chosen = prompts.filter(pl.col("split").is_in(list(splits)))
    if scope == "subset":
        chosen = chosen.filter(pl.col("target_index") >= 0)
    if chosen.height == 0:
        raise ValueError(
            f"{what}: no {'/'.join(splits)} prompt to rank with scope {scope!r} "
            "(no true item among the candidates?)"
        )
    return chosen


def split_summary(rankings: pl.DataFrame) -> pl.DataFrame:
    """Per split: prompts ranked, their metrics, seconds per prompt."""
    rows = []
    for split, group in rankings.group_by("split", maintain_order=True):
        ranks = group["target_rank"].cast(pl.Float64).fill_null(np.inf).to_numpy()
        rows.append(
            {
                "split": split[0],
                "prompts": group.height,
                **ranking_metrics(ranks, (1, 5, 10)),
                "s_per_prompt": float(group["seconds"].mean()),
            }
        )
    return pl.DataFrame(rows)


def choose_paths(
    base_model: Path, dtype: str, attention: str, device: str
) -> tuple[DtypeChoice, AttentionChoice]:
    """The compute type and the segment windows' attention path for `base_model` on
    `device`: as requested, or measured here for `auto` (cached per process)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_model)
    choice = choose_dtype(dtype, device, model_gemm_shape(config))
    return choice, choose_attention(attention, choice.torch_dtype, device, config, False)


def resolve_auto_paths(
    base_model: Path, dtype: str, attention: str
) -> tuple[str, str, dict[str, Any]]:
    """`auto` dtype and attention measured in this process, once (choose_dtype caches it),
    and the figures that decided them. Measured anew in every launch, a near-threshold ratio
    could flip the type between two launches and with it the rankings."""
    if dtype != "auto":
        return dtype, attention, {}
    choice, path = choose_paths(base_model, dtype, attention, "cpu")
    chosen = choice.metadata() | (path.metadata() if attention == "auto" else {})
    return choice.chosen, path.chosen, chosen


def _to_ipc(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_ipc(buffer)
    return buffer.getvalue()


def launch_state() -> Any:
    """The launch's process layout. `PartialState` alone ignores the `ACCELERATE_USE_CPU` that
    `accelerate launch --cpu` (and our torchrun tests) set, which the `Accelerator` of the
    training script reads: without it several CPU processes would each rank everything."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def rank_file(job: RankJob, log: Callable[[str], None] | None = None) -> RankOutcome:
    """Rank `job.prompts` on every process of the launch; the gathered table on the main one."""
    from accelerate.utils import gather_object
    from transformers import AutoTokenizer

    state = launch_state()
    # "cpu" for every CPU process (torch names a distributed one's "cpu:0"); "cuda:i" per GPU
    device = "cpu" if state.device.type == "cpu" else str(state.device)
    prompts = pl.read_parquet(job.prompts)
    choice, attention = choose_paths(job.base_model, job.dtype, job.attention, device)
    if state.num_processes > 1:  # `auto` measures: every share in the main process's choice
        from accelerate.utils import broadcast_object_list

        choice, attention = broadcast_object_list([choice, attention])
    model = load_ranker(job.base_model, job.adapter, device, choice.torch_dtype, attention.chosen)
    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    over = trained_over(job.adapter)
    with state.split_between_processes(list(range(prompts.height))) as mine:
        share = prompts[mine] if mine else prompts.clear()
        what = job.what if state.num_processes == 1 else f"{job.what} (process 0's share)"
        progress = ProgressLog(what, share.height, log) if log and state.is_main_process else None
        started = time.perf_counter()
        if share.height:
            ranked = rank_prompts(model, tokenizer, share, job.batch_size, progress, over)
        else:  # more processes than prompts
            ranked = pl.DataFrame(schema=RANKING_COLUMNS)
        seconds = time.perf_counter() - started
    parts = gather_object([(_to_ipc(ranked), seconds)])
    table = None
    if state.is_main_process:
        table = pl.concat([pl.read_ipc(io.BytesIO(part)) for part, _ in parts])
        assert table["example_id"].to_list() == prompts["example_id"].to_list(), (
            "the gathered rankings are not in the prompts' order"
        )
    return RankOutcome(
        table=table,
        dtype=choice,
        attention=attention,
        retriever_prior=over,
        processes=state.num_processes,
        device=device,
        ranking_seconds=max(s for _, s in parts),
    )


def outcome_metadata(outcome: RankOutcome) -> dict[str, Any]:
    """What the asset shows of a launch: how it ran and how fast (JSON-serialisable)."""
    assert outcome.table is not None, "only the main process holds the table"
    n = outcome.table.height
    tokens = float(outcome.table["n_tokens"].sum()) if n else 0.0
    seconds = outcome.ranking_seconds
    return {
        "scores": "retriever log-prior + LLM (adapter trained over the retriever)"
        if outcome.retriever_prior
        else "LLM",
        "device": outcome.device,
        "processes": outcome.processes,
        "prompts": n,
        "seconds": round(seconds, 1),
        "prompts_per_s": round(n / seconds, 2) if seconds > 0 else 0.0,
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        **outcome.dtype.metadata(),
        **outcome.attention.metadata(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lkg_pipeline.core.llm.rank", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--base-model", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--what", default="rankings")
    parser.add_argument("--attention", choices=ATTENTION_PATHS, default="auto")
    return parser


def script_args(job: RankJob) -> list[str]:
    """The command-line arguments that make `job` again (`job_from_args`)."""
    args = ["--prompts", str(job.prompts), "--base-model", str(job.base_model)]
    if job.adapter is not None:
        args += ["--adapter", str(job.adapter)]
    args += ["--output", str(job.output), "--dtype", job.dtype, "--what", job.what]
    args += ["--attention", job.attention]
    if job.batch_size is not None:
        args += ["--batch-size", str(job.batch_size)]
    return args


def job_from_args(args: argparse.Namespace) -> RankJob:
    """The job `build_parser` reads (its options are named as RankJob's fields)."""
    return RankJob(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RankJob)})


def main(argv: Sequence[str] | None = None) -> int:
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    job = job_from_args(build_parser().parse_args(argv))
    main_process = launch_state().is_main_process
    # Every process ranks; only the main one opens the Pipes channel and writes (as train_lora)
    if main_process and PipesEnvVarParamsLoader().is_dagster_pipes_process():
        with open_dagster_pipes() as pipes:
            outcome = rank_file(job, pipes.log.info)
            assert outcome.table is not None
            write_parquet_atomic(outcome.table, job.output)
            pipes.report_asset_materialization(metadata=outcome_metadata(outcome))
        return 0

    def say(line: str) -> None:  # a run from a shell: progress and the summary on stderr
        sys.stderr.write(line + "\n")

    outcome = rank_file(job, say if main_process else None)
    if outcome.table is not None:
        write_parquet_atomic(outcome.table, job.output)
        say(json.dumps(outcome_metadata(outcome)))
    return 0
