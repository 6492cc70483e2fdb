"""Group `llm`: the base model, the prompt datasets and (later) the LoRA adapter."""

import dataclasses
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import dagster as dg
import polars as pl

from lkg_pipeline.core.io.storage import ParquetParts, replace_atomically, replace_dir_atomically
from lkg_pipeline.core.llm.model import (
    folder_name,
    letter_token_ids,
    load_base,
    parameter_count,
    sanity_generation,
    save_checkpoint,
)
from lkg_pipeline.core.llm.prompt_parts import PromptTally, token_count, write_prompts
from lkg_pipeline.core.llm.prompts import (
    PATHS_KEY,
    SETTINGS_KEY,
    VARIANTS,
    PromptConfig,
    PromptSettings,
    prompts_in_batches,
    recorded_settings,
    truncate_titles,
)
from lkg_pipeline.core.llm.train.config import TrainConfig
from lkg_pipeline.defs.layout import (
    adapter_dir,
    base_model_root,
    cache_dir,
    current_base_model,
    prompts_file,
    scratch_dir,
    selected_paths_file,
)
from lkg_pipeline.defs.metadata import markdown_table
from lkg_pipeline.defs.partitions import dataset_partitions
from lkg_pipeline.defs.resources import DEFAULT_LAKE, TORCH_POOL, DataLake
from lkg_pipeline.defs.reuse import Made, Recomputable, reuse_or_run, versioned
from lkg_pipeline.defs.run_config import differs_from_core

variant_partitions = dg.StaticPartitionsDefinition(list(VARIANTS))
dataset_variant_partitions = dg.MultiPartitionsDefinition(
    {"dataset": dataset_partitions, "variant": variant_partitions}
)
BY_DATASET = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="dataset")
# Amazon items are products people buy; MovieLens items are films people watch.
ITEM_WORDS = {
    "ml-100k": ("movie", "watch"),
    "ml-latest-small": ("movie", "watch"),
    "beauty": ("product", "buy"),
}


class BaseModelConfig(dg.Config):
    source: str = "smollm2-135m"  # or "tiny-random", a Hugging Face id, a local folder
    seed: int = 0  # initialisation of tiny-random


@dg.asset(group_name="llm", code_version=versioned("1", __name__), kinds={"pytorch", "safetensors"})
def base_model(
    context: dg.AssetExecutionContext, config: BaseModelConfig, lake: DataLake
) -> dg.MaterializeResult:
    """A causal LM as a plain checkpoint folder (fp32 safetensors + tokenizer)."""
    model, tokenizer, description = load_base(config.source, cache_dir(lake.path), config.seed)
    folder = folder_name(config.source)
    target = base_model_root(lake.path) / folder
    letters = letter_token_ids(tokenizer, "Candidate pool:\n(A) x\nAnswer:")
    params = parameter_count(model)
    provenance = {
        "source": config.source,
        "description": description,
        "parameters": params,
        "letter_token_ids": letters,
    }
    replace_dir_atomically(target, functools.partial(save_checkpoint, model, tokenizer, provenance))
    replace_atomically(
        base_model_root(lake.path) / "current.json",
        lambda tmp: tmp.write_text(json.dumps({"folder": folder})),
    )
    sample = sanity_generation(model, tokenizer)
    context.log.info(f"{description}: 'The capital of France is' → {sample!r}")
    return dg.MaterializeResult(
        metadata=_base_model_metadata(target, provenance, tokenizer, sample)
    )


def _base_model_metadata(target: Path, provenance: dict, tokenizer: Any, sample: str) -> dict:
    letters = provenance["letter_token_ids"]
    return {
        "path": dg.MetadataValue.path(str(target)),
        "source": provenance["description"],
        "parameters": provenance["parameters"],
        "vocab_size": len(tokenizer),
        "letter_token_ids": dg.MetadataValue.json(dict(zip("ABCDEFGHIJKLMNOPQRST", letters))),
        "sanity_generation": f"The capital of France is{sample}",
    }


class PromptRunConfig(dg.Config):
    NOT_EXPOSED: ClassVar[dict[str, str]] = {
        "item_noun": "per dataset (ITEM_WORDS)",
        "item_verb": "per dataset (ITEM_WORDS)",
    }

    max_history: int = PromptConfig.max_history
    max_title_tokens: int = PromptConfig.max_title_tokens
    max_prompt_tokens: int = differs_from_core(
        2048, "ml-100k's prompts (~880 tokens letters, ~850 segments) are never cut"
    )
    # letters: the paper's lettered candidate pool; segments: one block-masked segment per
    # candidate after a shared history (core.llm.segments), no position bias
    format: Literal["letters", "segments"] = differs_from_core(
        "segments", "the format `make quality` measured to learn (benchmarks/quality/QUALITY.md)"
    )
    # How each candidate's segment ends ({noun}, {verb} filled in): the cue alone, the prefix
    # asks the question; e.g. "Is it the {noun} they will {verb} next? Answer:" as before
    segment_question: str = PromptConfig.segment_question
    # Examples rendered together: bounds memory (the texts), never changes a prompt.
    examples_per_batch: int = 10_000


@dg.asset(
    automation_condition=dg.AutomationCondition.eager(),  # see sensors.py
    group_name="llm",
    partitions_def=dataset_variant_partitions,
    code_version=versioned("2", __name__),
    kinds={"polars", "parquet"},
    ins={
        **{
            name: dg.AssetIn(partition_mapping=BY_DATASET)
            for name in ("candidates", "sequences", "items")
        },
        # only the KG variants read it: `llamarec` prompts can be made without it
        "selected_paths": dg.AssetIn(
            partition_mapping=BY_DATASET, metadata={"allow_missing_partitions": True}
        ),
    },
    deps=["base_model"],
)
def prompts(
    context: dg.AssetExecutionContext,
    config: PromptRunConfig,
    lake: DataLake,
    candidates: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
    selected_paths: pl.LazyFrame | None,
) -> Iterator[dg.Output[ParquetParts]]:
    """One rendered prompt per example (train/val/test) for a dataset and a variant.

    Rendered a slice of examples at a time, in parts the IO manager concatenates: the
    texts are the largest thing the pipeline holds (~4 KB a prompt, 12 GB at 1M users)."""
    from transformers import AutoTokenizer

    keys = context.partition_key.keys_by_dimension
    dataset, variant = keys["dataset"], keys["variant"]
    tokenizer = AutoTokenizer.from_pretrained(current_base_model(lake.path))
    noun, verb = ITEM_WORDS[dataset]
    core = PromptConfig(
        item_noun=noun, item_verb=verb, **config.model_dump(exclude={"examples_per_batch"})
    )
    titles = truncate_titles(
        dict(items.select("item_idx", "title").iter_rows()), tokenizer, core.max_title_tokens
    )
    settings = _prompt_settings(core, dataset, variant, selected_paths, lake.path)
    count = functools.partial(token_count, tokenizer)
    batches = prompts_in_batches(
        candidates, sequences, titles, selected_paths, variant, core, count,
        config.examples_per_batch,
    )  # fmt: skip
    parts = ParquetParts(scratch_dir(lake.path) / f"prompts-{dataset}-{variant}")
    try:
        tally = write_prompts(batches, parts, tokenizer, core.format)
        # the IO manager writes the file before the parts are removed
        yield dg.Output(parts, metadata=_prompts_metadata(tally, parts, settings))
    finally:
        parts.remove()


def _prompt_settings(
    core: PromptConfig,
    dataset: str,
    variant: str,
    selected_paths: pl.LazyFrame | None,
    lake: Path,
) -> PromptSettings:
    """What the prompts are made with: `core`, and for a KG variant the settings its selected
    paths record (or a clear error when they were not materialised)."""
    if variant == "llamarec":
        return PromptSettings(core)
    if selected_paths is None:
        raise FileNotFoundError(
            f"{variant} prompts show KG paths: materialise selected_paths for {dataset} "
            "first (after kg_paths and preference_model)"
        )
    file = selected_paths_file(lake, dataset)  # the settings it was selected with
    made_with = recorded_settings(pl.read_parquet_metadata(file), PATHS_KEY, str(file))
    return PromptSettings.from_dict({**made_with, "prompt": dataclasses.asdict(core)})


def _prompts_metadata(tally: PromptTally, parts: ParquetParts, settings: PromptSettings) -> dict:
    return {
        "examples": dg.MetadataValue.md(markdown_table(tally.examples)),
        "token_lengths": dg.MetadataValue.md(markdown_table(tally.token_lengths)),
        "samples": dg.MetadataValue.md("\n\n".join(f"```\n{p}\n```" for p in tally.samples)),
        "max_tokens": tally.max_tokens,
        "batches": len(parts.files),
        # also written into the file (ParquetIOManager): what recommendations rebuild from
        SETTINGS_KEY: dg.MetadataValue.json(json.loads(settings.to_json())),
    }


class AccelerateLaunch(dg.Config):
    """How an LLM stage's script is started: `accelerate launch`, one CPU process with two
    threads unless an `accelerate config` file (GPUs, several processes or machines) says
    otherwise. Shared by lora_adapter, rankings and recommendations."""

    # An `accelerate config` file (relative paths: to the repository root); None: one CPU
    # process.
    accelerate_config: str | None = None

    def launch_file(self) -> Path | None:
        if not self.accelerate_config:
            return None
        return DEFAULT_LAKE.parent / Path(self.accelerate_config).expanduser()

    def launcher(self) -> list[str]:
        accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
        if self.accelerate_config:
            return [*accelerate, "--config_file", self.accelerate_config]
        return [
            *accelerate,
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--num_cpu_threads_per_process",
            "2",
        ]


class LoraRunConfig(Recomputable, AccelerateLaunch):
    """`TrainConfig` plus how to launch it. The paper's recipe learns nothing at a CPU budget
    of ~20 optimizer steps: the defaults here are the short-run recipe `make quality` trains
    (benchmarks/quality/QUALITY.md), each difference declared below with its reason."""

    NOT_EXPOSED: ClassVar[dict[str, str]] = {}

    lora_r: int = differs_from_core(16, "the paper's 8; the short-run recipe of make quality")
    lora_alpha: int = TrainConfig.lora_alpha
    lora_dropout: float = differs_from_core(
        0.0,
        "the paper's 0.05; drawing its masks slows every CPU step (x1.31 training tokens/s "
        "without, `make bench-dtype`) and regularises nothing in one pass over a few hundred "
        "prompts",
    )
    target_modules: list[str] = differs_from_core(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "every linear layer (the paper: q/v); the short-run recipe of make quality",
    )
    lora_layers: int | None = differs_from_core(
        10,
        "the paper: every layer; backward stops at the lowest adapted layer, so the top 10 of "
        "SmolLM2's 30 train ~2.5x as fast, validation no worse (`make bench-lora-layers`); a "
        "model of 10 layers or fewer gets LoRA in all",
    )
    lr: float = differs_from_core(5e-4, "the paper's 1e-4; the short-run recipe of make quality")
    warmup_steps: int = differs_from_core(
        3, "the paper's 100 would never reach the peak rate in ~20 optimizer steps"
    )
    epochs: int = TrainConfig.epochs
    batch_size: int = TrainConfig.batch_size
    grad_accum: int = TrainConfig.grad_accum
    max_train_examples: int | None = differs_from_core(
        160,
        "core: every example; with 2 validations of 50 it keeps this stage to a few minutes on "
        "2 CPU cores (`make bench-e2e`); None trains on every example, as on a GPU",
    )
    max_val_examples: int | None = differs_from_core(50, "core: 100; the CPU budget")
    eval_every: int = TrainConfig.eval_every
    checkpoint_every: int = TrainConfig.checkpoint_every
    weight_decay: float = TrainConfig.weight_decay
    max_grad_norm: float = TrainConfig.max_grad_norm
    eval_batch_size: int = TrainConfig.eval_batch_size
    log_every: int = TrainConfig.log_every
    loss: Literal["letters", "lm"] = TrainConfig.loss
    seed: int = TrainConfig.seed
    # Learn the LLM's scores as a correction on top of the retriever's (docs/stages.md); off
    # by default: it has not beaten the retriever on validation.
    retriever_prior: bool = TrainConfig.retriever_prior
    max_steps: int | None = TrainConfig.max_steps
    # core.llm.precision: bf16 where it measures faster
    dtype: Literal["auto", "float32", "bfloat16"] = TrainConfig.dtype
    attention: Literal["auto", "kernel", "matmul"] = "auto"  # core.llm.segments: auto measures
    resume: bool = True  # continue an interrupted run from its last checkpoint

    def to_core(self) -> TrainConfig:
        fields = TrainConfig.__dataclass_fields__
        values = {k: v for k, v in self.model_dump().items() if k in fields}
        return TrainConfig(**values | {"target_modules": tuple(self.target_modules)})

    def script_args(self) -> list[str]:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        args = []
        for name, value in self.model_dump().items():
            if name in fields:
                flag = f"--{name.replace('_', '-')}"
                if isinstance(value, list):  # nargs="+"
                    args += [flag, *map(str, value)]
                elif isinstance(value, bool):  # BooleanOptionalAction
                    args.append(flag if value else f"--no-{flag.removeprefix('--')}")
                else:
                    args += [flag, "none" if value is None else str(value)]
        # A partial run of other inputs cannot be resumed: this asset only trains when its
        # inputs or settings changed (or after an interruption, which resumes).
        return args + (["--resume", "--restart-other-run"] if self.resume else ["--no-resume"])


@dg.asset(
    automation_condition=dg.AutomationCondition.eager(),  # see sensors.py
    group_name="llm",
    pool=TORCH_POOL,  # one such step at a time (dagster.yaml)
    partitions_def=dataset_variant_partitions,
    code_version=versioned("1", __name__),
    kinds={"pytorch", "accelerate"},
    deps=["base_model", "prompts"],
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraRunConfig,
    lake: DataLake,
    pipes_subprocess_client: dg.PipesSubprocessClient,
):
    """The ranker's LoRA adapter, trained by `accelerate launch` in its own process.

    The script reports through Dagster Pipes (main process only): losses, learning rate and
    validation metrics stream into this run's log, and the final figures become this
    materialisation's metadata. Cancelling the run terminates the process; its checkpoints let
    the next run resume.
    """
    keys = context.partition_key.keys_by_dimension
    dataset, variant = keys["dataset"], keys["variant"]
    prompts_path, base = prompts_file(lake.path, dataset, variant), current_base_model(lake.path)
    output = adapter_dir(lake.path, dataset, variant)

    def train() -> Made:
        command = [
            *config.launcher(), "-m", "lkg_pipeline.core.llm.train",
            "--prompts", str(prompts_path), "--base-model", str(base), "--output", str(output),
            *config.script_args(),
        ]  # fmt: skip
        context.log.info(" ".join(command))
        reported = pipes_subprocess_client.run(command=command, context=context)
        return Made({"adapter": output}, dict(reported.get_materialize_result().metadata or {}))

    inputs = {
        "prompts": prompts_path,
        "base_model": base,
        "accelerate_config": config.launch_file(),
    }
    return reuse_or_run(context, lake.path, config, inputs, {"adapter": output}, train)
