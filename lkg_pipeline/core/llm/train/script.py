"""LoRA fine-tuning of the ranker: one prompt in, the 20 letter logits at the last position out.

The script follows the shape of accelerate's `complete_nlp_example.py` (get_dataloaders →
training_function → main) so the same file runs as `python -m lkg_pipeline.core.llm.train`, as
`accelerate launch … -m lkg_pipeline.core.llm.train`, in-process from tests, and under Dagster
Pipes. It imports no Dagster: `dagster_pipes` (a dependency-free client) is only touched in
`main()`, and only on the main process (DESIGN.md §3: a second rank opening the channel gives
"Multiple materialize results").

Files, for `--output OUT`:
- `OUT.partial/` while training: `run.json` (what the run was made from), `checkpoints/step_N`
  (accelerate state with adapter-only weights + `progress.json`), `best/` (the adapter with the
  best validation NDCG@10 so far). Re-running the same command resumes from the latest
  checkpoint; it is deleted once all epochs are done.
- `OUT/` only when a run ends (all epochs, or `max_steps`): the best adapter in PEFT format
  (`PeftModel.from_pretrained(base, OUT)`) and `training.json`, swapped in atomically, so a
  crashed or cancelled run leaves the previous complete `OUT` (or none).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import resource
import shutil
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch
from torch.nn import functional as F

from lkg_pipeline.core.data.sources import sha256_of
from lkg_pipeline.core.evaluate.metrics import rank_of_target, ranking_metrics
from lkg_pipeline.core.io.fingerprints import folder_digest, library_versions
from lkg_pipeline.core.io.storage import replace_atomically, replace_dir_atomically
from lkg_pipeline.core.llm.lowrank import folded
from lkg_pipeline.core.llm.model import (
    LETTERS,
    final_hidden,
    fuse_rms_norms,
    letter_token_ids,
    token_logits,
)
from lkg_pipeline.core.llm.precision import DTYPES, DtypeChoice, choose_dtype, model_gemm_shape
from lkg_pipeline.core.llm.prompts import PROMPT_COLUMNS
from lkg_pipeline.core.llm.rank.scoring import (
    left_pad,
    max_positions,
    pad_token_id,
    prompt_log_priors,
    prompt_segments,
    score_prompts,
    tokenize_prompt,
)
from lkg_pipeline.core.llm.segments import (
    ATTENTION_PATHS,
    AttentionChoice,
    answer_token_ids,
    choose_attention,
    segment_batch,
    segment_scores,
    tokenize_segments,
    use_segment_attention,
)
from lkg_pipeline.core.llm.train.lora_dropout import use_word_dropout

if TYPE_CHECKING:
    from accelerate import Accelerator

LOSSES = ("letters", "lm")
SELECTION_METRIC = "NDCG@10"  # the adapter kept is the one with the best value of this on val
EVAL_KS = (1, 5, 10)
ADAPTER_STATE = "adapter_state.safetensors"  # LoRA weights inside an accelerate checkpoint
# Fields that may change between a run and its resumption: they decide how long it runs and
# how often it reports, not what it computes.
RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "log_every", "eval_batch_size")


@dataclass(frozen=True)
class TrainConfig:
    lora_r: int = 8  # LoRA rank, as in LlamaRec
    lora_alpha: int = 32  # LoRA scale = alpha / r = 4, as in LlamaRec
    lora_dropout: float = 0.05  # on the LoRA input only, as in LlamaRec
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # attention projections, as in LlamaRec
    # LoRA in the top `lora_layers` decoder layers only (None: every layer, as in LlamaRec).
    # Backward then stops at the lowest adapted layer and the layers below run as inference
    # (no activations kept): a training step costs about forward + backward of that top part.
    lora_layers: int | None = None
    lr: float = 1e-4  # AdamW peak learning rate, as in LlamaRec
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA weights (HF Trainer's default)
    warmup_steps: int = 100  # linear warm-up (optimizer steps), then linear decay to 0
    epochs: int = 1  # passes over the train prompts, as in LlamaRec
    batch_size: int = 1  # prompts per forward per process: on CPU a bigger one only adds padding
    grad_accum: int = 8  # forwards per optimizer step: 8 prompts, ~21 s for SmolLM2 on 2 cores
    max_grad_norm: float = 1.0  # gradient clipping (HF Trainer's default)
    max_train_examples: int | None = None  # None = every train prompt whose target is a candidate
    max_val_examples: int | None = 100  # val prompts per evaluation (~110 s for SmolLM2 on 2 cores)
    eval_batch_size: int = 4  # prompts per scoring forward (sorted by length: little padding)
    eval_every: int = 50  # optimizer steps between validations (also at step 0 and at the end)
    log_every: int = 10  # optimizer steps between loss/lr reports
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    loss: str = "letters"  # "letters": CE over the 20 letter logits; "lm": the reference's LM loss
    seed: int = 0  # LoRA init, dropout, data order and the train/val subsets
    # Train the LLM's 20 scores as a correction to the retriever's: the loss is CE over
    # log-softmax(retriever scores) + LLM scores, and validation ranks by that sum (what the
    # `+prior` ranker with λ = 1 computes). Needs retriever scores on train prompts
    # (candidates' train_policy "retriever"). Off: the LLM alone, as in the paper.
    retriever_prior: bool = False
    max_steps: int | None = None  # stop early (tests, smoke runs); the LR schedule is unchanged
    # What the frozen base computes in (core.llm.precision): auto = bf16 where it measures faster.
    # LoRA weights and the optimiser stay fp32 in every case.
    dtype: str = "auto"
    # The path of the segment windows (core.llm.segments.choose_attention): auto times both.
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        for name in (
            "lora_r",
            "epochs",
            "batch_size",
            "grad_accum",
            "eval_batch_size",
            "eval_every",
            "log_every",
            "checkpoint_every",
        ):
            assert getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}"
        for name in ("max_train_examples", "max_val_examples", "max_steps", "lora_layers"):
            value = getattr(self, name)
            assert value is None or value >= 1, f"{name} must be None or >= 1, got {value}"
        assert self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"
        assert self.target_modules, "target_modules must name at least one module"
        if self.retriever_prior and self.loss != "letters":
            raise ValueError("retriever_prior needs loss 'letters' (a score per candidate)")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {DTYPES}")
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"unknown attention {self.attention!r}; one of {ATTENTION_PATHS}")


@dataclass(frozen=True)
class RunPaths:
    prompts: Path  # the prompts Parquet file (see PROMPT_COLUMNS)
    base_model: Path  # a Hugging Face checkpoint folder (config, safetensors, tokenizer)
    output: Path  # where the finished adapter is published

    @property
    def partial(self) -> Path:
        return self.output.with_name(self.output.name + ".partial")


@dataclass
class TrainResult:
    output: Path
    step: int  # optimizer steps done in total (over resumptions)
    finished: bool  # all epochs done (False when stopped by max_steps)
    best_step: int
    best_val: dict[str, float]
    history: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)  # the figures in training.json
    model: Any = None  # the in-memory PeftModel after the last step (published: the best one)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Examples:
    example_ids: list[int]
    prompts: list[str]
    targets: list[int]  # 0..19: the position of the true item among the candidates
    segments: list[list[str]] | None = None  # the segments format (prompts are the prefixes)
    # (N, 20) log-softmax of the retriever's scores over the candidates, when asked for
    priors: np.ndarray | None = None


def read_examples(
    path: Path, split: str, limit: int | None, seed: int, with_prior: bool = False
) -> Examples:
    """Rows of `split` whose true item is among the candidates (the only ones a ranker can learn
    from or be scored on), a seeded sample of `limit` of them, in example_id order; with
    `with_prior`, the retriever's log-prior of each candidate too."""
    frame = pl.read_parquet(path)
    for name in ("segments", "retriever_scores"):  # files written before these columns existed
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, PROMPT_COLUMNS[name]).alias(name))
    frame = frame.select(list(PROMPT_COLUMNS))
    wrong = {c: str(frame.schema[c]) for c, t in PROMPT_COLUMNS.items() if frame.schema[c] != t}
    assert not wrong, f"{path}: columns with unexpected types {wrong}; want {PROMPT_COLUMNS}"
    sizes = frame["candidate_item_idxs"].list.len()
    assert bool((sizes == len(LETTERS)).all()), f"{path}: every row needs {len(LETTERS)} candidates"
    bad = frame.filter((pl.col("target_index") < -1) | (pl.col("target_index") >= len(LETTERS)))
    assert bad.height == 0, f"{path}: target_index outside -1..19 in {bad.height} rows"
    rows = frame.filter((pl.col("split") == split) & (pl.col("target_index") >= 0))
    if limit is not None and rows.height > limit:
        rows = rows.sample(n=limit, seed=seed)
    rows = rows.sort("example_id")
    priors = prompt_log_priors(rows, f"{split} prompts", f"{path}: ") if with_prior else None
    return Examples(
        example_ids=rows["example_id"].to_list(),
        prompts=rows["prompt"].to_list(),
        targets=rows["target_index"].cast(pl.Int64).to_list(),
        segments=prompt_segments(rows),
        priors=priors,
    )


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A fresh permutation per epoch that depends only on (seed, epoch).

    Resuming re-creates exactly the order of the interrupted epoch, so skipping the batches
    already trained on skips the same examples. accelerate calls `set_epoch` on it.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    if "segments" in rows[0]:  # the segments format: block mask, scores at segment ends
        batch = segment_batch([r["segments"] for r in rows], pad_id)
        batch["answer_ids"] = torch.tensor([r["answer_ids"] for r in rows])  # (B, 2)
        batch["n_tokens"] = torch.tensor([r["segments"].n_tokens for r in rows])  # (B,)
    else:
        batch = left_pad([r["input_ids"] for r in rows], pad_id)
        batch["letter_ids"] = torch.tensor([r["letter_ids"] for r in rows])  # (B, 20)
        batch["n_tokens"] = batch["attention_mask"].sum(dim=1)  # (B,) without padding
    batch["target"] = torch.tensor([r["target"] for r in rows])  # (B,)
    if "prior" in rows[0]:
        batch["prior"] = torch.tensor(np.stack([r["prior"] for r in rows]), dtype=torch.float32)
    return batch


def _letter_rows(
    tokenizer: Any, train: Examples, config: TrainConfig, max_positions: int
) -> list[dict[str, Any]]:
    rows = []
    for prompt, target in zip(train.prompts, train.targets, strict=True):
        letters = letter_token_ids(tokenizer, prompt)
        ids = tokenize_prompt(tokenizer, prompt)
        if config.loss == "lm":  # the reference's answer: the letter, then EOS
            ids = [*ids, letters[target], int(tokenizer.eos_token_id)]
        assert len(ids) <= max_positions, (
            f"a train prompt has {len(ids)} tokens > model limit {max_positions}"
        )
        rows.append({"input_ids": ids, "letter_ids": letters, "target": target})
    return rows


def _segment_rows(
    tokenizer: Any, train: Examples, config: TrainConfig, max_positions: int
) -> list[dict[str, Any]]:
    if config.loss != "letters":
        raise ValueError("the segments format trains with loss 'letters' (CE over the 20)")
    assert train.segments is not None
    rows = []
    for prefix, parts, target in zip(train.prompts, train.segments, train.targets, strict=True):
        tokens = tokenize_segments(tokenizer, prefix, parts)
        longest = len(tokens.prefix) + max(len(p) for p in tokens.segments)
        assert longest <= max_positions, f"a train prompt reaches position {longest}"
        answers = answer_token_ids(tokenizer, parts[0])
        rows.append({"segments": tokens, "answer_ids": answers, "target": target})
    return rows


def get_dataloaders(
    accelerator: Accelerator, config: TrainConfig, tokenizer: Any, prompts: Path, max_positions: int
) -> tuple[torch.utils.data.DataLoader, Examples, list[list[int]]]:
    """(train loader, val examples, distinct letter-id lists seen in the train prompts)."""
    with accelerator.main_process_first():
        prior = config.retriever_prior
        train = read_examples(prompts, "train", config.max_train_examples, config.seed, prior)
        val = read_examples(prompts, "val", config.max_val_examples, config.seed, prior)
        if train.segments is not None:
            rows = _segment_rows(tokenizer, train, config, max_positions)
        else:
            rows = _letter_rows(tokenizer, train, config, max_positions)
        if train.priors is not None:
            for row, row_prior in zip(rows, train.priors, strict=True):
                row["prior"] = row_prior
    assert rows, f"{prompts}: no train rows with the true item among the candidates"
    assert val.prompts, f"{prompts}: no val rows with the true item among the candidates"
    pad_id = pad_token_id(tokenizer)
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=config.batch_size,
        sampler=EpochShuffle(len(rows), config.seed),
        collate_fn=lambda batch: collate(batch, pad_id),
    )
    seen = sorted({tuple(r.get("letter_ids", r.get("answer_ids"))) for r in rows})
    return loader, val, [list(s) for s in seen]


def batch_loss(model: Any, batch: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
    """Mean loss of a batch; only the logits the loss reads are computed (`token_logits`,
    `logits_to_keep`). With a `prior` in the batch (retriever_prior) the 20 scores are added
    to the retriever's log-prior before the softmax: the LLM learns what the retriever misses."""
    prior = batch.get("prior")  # (B, 20) or None
    if "ends" in batch:  # the segments format
        assert loss == "letters", f"the segments format has no {loss!r} loss"
        answers = batch["answer_ids"]  # (B, 2), one pair for the whole batch
        assert bool((answers == answers[0]).all()), "a batch mixes answer tokens"
        scores = segment_scores(model, batch, (int(answers[0, 0]), int(answers[0, 1])))
        if prior is not None:
            scores = scores + prior
        return F.cross_entropy(scores, batch["target"])  # (B, 20) → mean over the batch
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if loss == "letters":
        last = final_hidden(model, **inputs)[:, -1]  # (B, H)
        letters = token_logits(model, last, batch["letter_ids"])  # (B, 20), fp32
        if prior is not None:
            letters = letters + prior
        return F.cross_entropy(letters, batch["target"])
    assert prior is None, "retriever_prior works with the 20-score losses, not 'lm'"
    if loss == "lm":
        # Left padding puts (last prompt token, letter, EOS) in the last 3 columns; the logits of
        # the first two predict the letter and EOS: the reference's LM loss on the answer
        # tokens with the prompt masked, without the vocabulary projection of every position.
        logits = model(**inputs, logits_to_keep=3, use_cache=False).logits[:, :2]  # (B, 2, V)
        labels = batch["input_ids"][:, -2:]  # (B, 2)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")


def evaluate(
    accelerator: Accelerator, model: Any, tokenizer: Any, val: Examples, batch_size: int
) -> dict[str, float]:
    """Subset metrics on val: each process scores its share, ranks are gathered. With the
    retriever's log-prior (retriever_prior) the ranking is by prior + LLM score. The adapter
    is folded while it scores (`lowrank.folded`), as ranking folds it: peft's fp32 branch over
    a bf16 base made validation about twice as slow as ranking the same prompts."""
    from accelerate.utils import gather_object

    unwrapped = accelerator.unwrap_model(model)
    with (
        accelerator.split_between_processes(list(range(len(val.prompts)))) as mine,
        folded(unwrapped) as scorer,
    ):
        segments = None if val.segments is None else [val.segments[i] for i in mine]
        prompts = [val.prompts[i] for i in mine]
        scores = score_prompts(scorer, tokenizer, prompts, batch_size, segments)
        if val.priors is not None and mine:
            scores = scores + torch.as_tensor(val.priors[list(mine)], dtype=scores.dtype)
        target = torch.tensor([val.targets[i] for i in mine], dtype=torch.long)  # (n,)
        ranks = rank_of_target(scores, target, tie_break="index").tolist() if mine else []
    ranks = gather_object(ranks)
    return ranking_metrics(np.asarray(ranks, dtype=np.float64), ks=EVAL_KS)


# ----------------------------------------------------------------------------- run state


def _identity(config: TrainConfig, paths: RunPaths, dtype: DtypeChoice) -> dict[str, Any]:
    """What a checkpoint was made from: resuming it with anything else would mix two runs."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    settings["target_modules"] = list(config.target_modules)
    return {
        "config": settings,
        "compute_dtype": dtype.chosen,  # `auto` may resolve differently on another machine
        "prompts": str(paths.prompts.resolve()),
        "prompts_sha256": sha256_of(paths.prompts),
        "base_model": str(paths.base_model.resolve()),
        # the folder's content: re-materialising another model into the same folder must not
        # resume checkpoints made on the old one
        "base_model_sha256": folder_digest(paths.base_model),
    }


def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is renamed into place when complete)."""
    done = [p for p in root.glob("step_*") if (p / "progress.json").exists()]
    return sorted(done, key=lambda p: int(p.name.removeprefix("step_")))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _prepare_partial(
    accelerator: Accelerator,
    paths: RunPaths,
    identity: dict[str, Any],
    resume: bool,
    restart_other_run: bool = False,
) -> Path | None:
    """The checkpoint to resume from, or None after clearing the partial folder.

    A partial run made from other prompts or settings is an error by default (hours of GPU
    work are not thrown away silently); the pipeline passes `restart_other_run`, because when
    its inputs have changed the old run can never be resumed.
    """
    run_file = paths.partial / "run.json"
    latest = None
    if resume and run_file.exists():
        before = json.loads(run_file.read_text())
        if before != identity:
            changed = sorted(k for k in identity if before.get(k) != identity[k])
            if not restart_other_run:
                raise ValueError(
                    f"{paths.partial} belongs to a different run (differs in {changed}); delete "
                    "it or pass --no-resume to start over"
                )
            accelerator.print(f"discarding {paths.partial}: made from a different {changed}")
        else:
            found = _checkpoints(paths.partial / "checkpoints")
            latest = found[-1] if found else None
    accelerator.wait_for_everyone()
    if latest is None and accelerator.is_main_process:
        shutil.rmtree(paths.partial, ignore_errors=True)
        (paths.partial / "checkpoints").mkdir(parents=True)
        replace_atomically(run_file, lambda tmp: tmp.write_text(json.dumps(identity, indent=2)))
    accelerator.wait_for_everyone()
    return latest


def _register_adapter_only_state(accelerator: Accelerator) -> None:
    """Checkpoint only the LoRA weights: the frozen base is already on disk, and saving it at
    every checkpoint would write the whole model (517 MiB for SmolLM2, GBs for Llama-2)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        assert len(models) == 1, f"expected one model, got {len(models)}"
        if accelerator.is_main_process:
            state = get_peft_model_state_dict(accelerator.unwrap_model(models[0]))
            save_file(
                {k: v.contiguous() for k, v in state.items()}, str(Path(output_dir) / ADAPTER_STATE)
            )
        weights.clear()  # accelerate then saves no full state dict

    def load_hook(models: list[Any], input_dir: str) -> None:
        state = load_file(str(Path(input_dir) / ADAPTER_STATE))
        result = set_peft_model_state_dict(accelerator.unwrap_model(models[0]), state)
        assert not result.unexpected_keys, f"unexpected adapter keys {result.unexpected_keys[:3]}"
        models.clear()  # accelerate then loads no full state dict

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _save_checkpoint(
    accelerator: Accelerator, root: Path, step: int, progress: dict[str, Any]
) -> None:
    """accelerate state + progress, renamed into place only when complete; older ones go."""
    final = root / f"step_{step}"
    staging = root / f".step_{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / "progress.json").write_text(json.dumps(progress, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in _checkpoints(root)[:-1]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _save_best(accelerator: Accelerator, model: Any, folder: Path, info: dict[str, Any]) -> None:
    """The adapter in PEFT format with its step and metrics, replaced as one folder so the
    metrics never describe another adapter than the weights beside them."""
    if accelerator.is_main_process:

        def write(staging: Path) -> None:
            accelerator.unwrap_model(model).save_pretrained(
                staging, is_main_process=accelerator.is_main_process, safe_serialization=True
            )
            (staging / "best.json").write_text(json.dumps(info, indent=2))

        replace_dir_atomically(folder, write)
    accelerator.wait_for_everyone()


def _publish(best: Path, output: Path, summary: dict[str, Any]) -> None:
    def write(staging: Path) -> None:
        for item in best.iterdir():
            if item.is_file() and item.name != "best.json":
                shutil.copy2(item, staging / item.name)
        (staging / "training.json").write_text(json.dumps(summary, indent=2))

    replace_dir_atomically(output, write)


# ----------------------------------------------------------------------------- training


def lora_config(config: TrainConfig, n_layers: int | None = None) -> Any:
    """The PEFT `LoraConfig` of a run: adapters on `target_modules` only, no bias; with
    `lora_layers`, only in the top that many of the model's `n_layers` decoder layers (all of
    them in a model that has no more: the same setting serves a 2-layer test model and 7B)."""
    from peft import LoraConfig

    layers = None
    if config.lora_layers is not None:
        if n_layers is None:
            raise ValueError("lora_layers needs the model's number of decoder layers")
        layers = list(range(max(n_layers - config.lora_layers, 0), n_layers))
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def layers_described(model: Any) -> str:
    """Which decoder layers carry LoRA, e.g. "layers 20-29 of 30" or "all 30 layers"."""
    n_layers = model.get_base_model().config.num_hidden_layers
    chosen = model.peft_config[model.active_adapter].layers_to_transform
    if chosen is None or len(chosen) == n_layers:
        return f"all {n_layers} layers"
    if len(chosen) == 1:
        return f"layer {chosen[0]} of {n_layers}"
    return f"layers {min(chosen)}-{max(chosen)} of {n_layers}"


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The Accelerator for `config`, built before anything asks which process is the main one:
    a bare `PartialState()` made earlier would freeze the process layout without the launcher's
    `--cpu` flag (a 2-process CPU launch would then run as two independent 1-process runs)."""
    from accelerate import Accelerator

    # The scheduler is stepped by hand once per optimizer step, so warm-up and decay are
    # counted in optimizer steps whatever the number of processes.
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum, step_scheduler_with_optimizer=False
    )
    assert accelerator.gradient_accumulation_steps == config.grad_accum, (
        f"the launcher set gradient accumulation to {accelerator.gradient_accumulation_steps}, "
        f"the config says {config.grad_accum}: pass it through --grad-accum only"
    )
    return accelerator


@dataclass
class RunState:
    """Where a run stands: what a checkpoint's `progress.json` holds, so that a resumed run
    continues exactly where the interrupted one stopped."""

    step: int = 0  # optimizer steps done, over every run this one continues
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per logged step
    train_tokens: int = 0
    train_seconds: float = 0.0  # forward, backward and optimizer only
    wall_seconds: float = 0.0  # spent by the runs this one resumes (updated at checkpoints)

    @classmethod
    def load(cls, checkpoint: Path) -> RunState:
        return cls(**json.loads((checkpoint / "progress.json").read_text()))

    def validated_now(self) -> bool:
        return any(h["step"] == self.step and "val" in h for h in self.history)


@dataclass
class Run:
    """The prepared pieces of one training run, and the three things it does with them:
    validate (keeping the best adapter), train one epoch, checkpoint."""

    config: TrainConfig
    paths: RunPaths
    accelerator: Accelerator
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_dl: Any
    val: Examples
    trainable: list[torch.nn.Parameter]
    steps_per_epoch: int
    on_log: Callable[[dict[str, Any]], None] | None
    started: float  # perf_counter when this process started the run
    earlier_wall: float = 0.0  # wall seconds of the runs this one resumes
    # The best so far is what best/ holds (saved with its metrics in one folder swap), which a
    # crash between a best save and the next checkpoint cannot make disagree with the weights.
    best: dict[str, Any] | None = None
    # The training forward's compute type below fp32 (bf16), else None: see `low_precision`.
    autocast: torch.dtype | None = None

    def low_precision(self) -> contextlib.AbstractContextManager[Any]:
        """The training forward over a bf16 base: the LoRA branch under autocast too.

        peft casts each adapted layer's input up to its fp32 LoRA weights, computes the
        branch in fp32 and casts the sum back: over a bf16 base that is several full-width
        copies per layer (what that costs a training step: `make bench-dtype`'s ablation,
        benchmarks/README.md#fp32-and-bf16). Under autocast with that input cast off, the
        branch runs as bf16 GEMMs (the fp32 master weights cast per use, the gradients fp32),
        as mixed-precision training does. The letter/answer logits keep fp32
        (`llm.token_logits` leaves autocast) and validation is computed without autocast, as
        ranking computes.
        """
        if self.autocast is None:
            return contextlib.nullcontext()
        from peft.helpers import disable_input_dtype_casting

        stack = contextlib.ExitStack()
        stack.enter_context(disable_input_dtype_casting(self.model))
        stack.enter_context(torch.autocast(self.accelerator.device.type, dtype=self.autocast))
        return stack

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def stop_at(self) -> int:
        limit = self.config.max_steps
        return self.total_steps if limit is None else min(self.total_steps, limit)

    @property
    def best_dir(self) -> Path:
        return self.paths.partial / "best"

    def record(self, state: RunState, **fields: Any) -> None:
        """Merge `fields` into the history entry of this step and report it (main only)."""
        if state.history and state.history[-1]["step"] == fields["step"]:
            state.history[-1].update(fields)
        else:
            state.history.append(dict(fields))
        if self.accelerator.is_main_process and self.on_log is not None:
            self.on_log(dict(fields))

    def validate(self, state: RunState) -> None:
        metrics = evaluate(
            self.accelerator, self.model, self.tokenizer, self.val, self.config.eval_batch_size
        )
        self.record(state, step=state.step, val=metrics)
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.accelerator.print(f"step {state.step}/{self.total_steps} | val {shown}")
        if self.best is None or metrics[SELECTION_METRIC] > self.best["val"][SELECTION_METRIC]:
            self.best = {"step": state.step, "val": metrics}
            _save_best(self.accelerator, self.model, self.best_dir, self.best)

    def checkpoint(self, state: RunState) -> None:
        state.wall_seconds = self.earlier_wall + time.perf_counter() - self.started
        root = self.paths.partial / "checkpoints"
        _save_checkpoint(self.accelerator, root, state.step, dataclasses.asdict(state))

    def train_epoch(self, state: RunState, epoch: int, skip_steps: int = 0) -> None:
        """Optimizer steps of one epoch (after the first `skip_steps`, done by the run this
        one resumes) until the epoch or `stop_at` ends; logs, validates and checkpoints on
        the configured steps. Tokens and seconds count forward, backward and optimizer only."""
        config, accelerator = self.config, self.accelerator
        self.train_dl.set_epoch(epoch)
        loader = self.train_dl
        if skip_steps:
            loader = accelerator.skip_first_batches(self.train_dl, skip_steps * config.grad_accum)
        window = _Window()
        for batch in loader:
            tick = time.perf_counter()
            with accelerator.accumulate(self.model):
                with self.low_precision():
                    loss = batch_loss(self.model, batch, config.loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.trainable, config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            window.add(loss, batch["n_tokens"].sum(), time.perf_counter() - tick)
            if not accelerator.sync_gradients:
                continue
            lr = self.scheduler.get_last_lr()[0]  # the rate this step used
            self.scheduler.step()
            state.step += 1
            if state.step % config.log_every == 0 or state.step == self.stop_at:
                self._log(state, epoch, lr, window)
                window = _Window()
            if state.step % config.eval_every == 0 or state.step == self.stop_at:
                self.validate(state)
            stopped_early = state.step == self.stop_at < self.total_steps  # re-runs go on here
            if state.step % config.checkpoint_every == 0 or stopped_early:
                self.checkpoint(state)
            if state.step >= self.stop_at:
                return

    def _log(self, state: RunState, epoch: int, lr: float, window: _Window) -> None:
        reduce = self.accelerator.reduce
        mean_loss = reduce(window.loss_sum / window.batches, reduction="mean").item()
        n_tokens = int(reduce(window.tokens, reduction="sum").item())
        rate = n_tokens / max(window.seconds, 1e-9)  # all processes together
        state.train_tokens += n_tokens
        state.train_seconds += window.seconds
        self.record(state, step=state.step, epoch=epoch, loss=mean_loss, lr=lr, tokens_per_s=rate)
        per_step = window.seconds / (window.batches / self.config.grad_accum)
        eta = (self.stop_at - state.step) * per_step / 60  # training only, not validation
        self.accelerator.print(
            f"step {state.step}/{self.total_steps} | loss {mean_loss:.4f} | lr {lr:.2e} | "
            f"{rate:.0f} tok/s | {per_step:.2f} s/step | ETA {eta:.1f} min"
        )


@dataclass
class _Window:
    """Training since the last log: non-pad tokens, summed loss, batches, busy seconds."""

    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    batches: int = 0
    seconds: float = 0.0

    def add(self, loss: torch.Tensor, tokens: torch.Tensor, seconds: float) -> None:
        self.loss_sum += loss.detach().float()
        self.tokens += tokens
        self.batches += 1
        self.seconds += seconds


def _prepare_run(
    config: TrainConfig,
    paths: RunPaths,
    accelerator: Accelerator,
    dtype: DtypeChoice,
    attention: str,
    on_log: Callable[[dict[str, Any]], None] | None,
    started: float,
) -> tuple[Run, list[list[int]], tuple[int, int]]:
    """Model (frozen base in `dtype`, fp32 LoRA), data, optimizer and schedule, through
    `accelerator.prepare`; also the letter ids seen and (trainable, total) parameters."""
    from accelerate.utils import set_seed
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(paths.base_model)
    base = AutoModelForCausalLM.from_pretrained(paths.base_model, dtype=dtype.torch_dtype)
    use_segment_attention(base, attention)  # the segments format's windowed attention
    fuse_rms_norms(base)  # torch's rms_norm for transformers', as ranking
    base.config.use_cache = False
    position_limit = max_positions(base)
    # autocast_adapter_dtype: LoRA weights in fp32 over a bf16 base (fp32 master weights)
    model = get_peft_model(
        base, lora_config(config, base.config.num_hidden_layers), autocast_adapter_dtype=True
    )
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    use_word_dropout(model)  # LoRA dropout's masks at a fraction of torch's CPU cost
    counts = model.get_nb_trainable_parameters()
    train_dl, val, letter_ids = get_dataloaders(
        accelerator, config, tokenizer, paths.prompts, position_limit
    )
    batches_per_process = math.ceil(len(train_dl) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / config.grad_accum)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, config.warmup_steps, steps_per_epoch * config.epochs
    )
    model, optimizer, train_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, scheduler
    )
    assert len(train_dl) == batches_per_process, f"{len(train_dl)} != {batches_per_process}"
    _register_adapter_only_state(accelerator)
    run = Run(
        config, paths, accelerator, model, tokenizer, optimizer, scheduler, train_dl, val,
        trainable, steps_per_epoch, on_log, started,
    )  # fmt: skip
    if dtype.torch_dtype != torch.float32:
        run.autocast = dtype.torch_dtype
    return run, letter_ids, counts


def _summary(
    run: Run,
    state: RunState,
    identity: dict[str, Any],
    dtype: DtypeChoice,
    attention: AttentionChoice,
    letter_ids: list[list[int]],
    counts: tuple[int, int],
) -> dict[str, Any]:
    """`training.json`: what was trained from, how, how far, the best adapter, how fast."""
    config, accelerator, best = run.config, run.accelerator, run.best
    assert best is not None
    n_trainable, n_total = counts
    finished = state.step >= run.total_steps
    return {
        "config": {**dataclasses.asdict(config), "target_modules": list(config.target_modules)},
        "prompts": identity["prompts"],
        "prompts_sha256": identity["prompts_sha256"],
        "base_model": identity["base_model"],
        "letter_token_ids": letter_ids,
        "n_train": len(run.train_dl.dataset),
        "n_val": len(run.val.prompts),
        "trainable_params": n_trainable,
        "total_params": n_total,
        "adapted_layers": layers_described(accelerator.unwrap_model(run.model)),
        "num_processes": accelerator.num_processes,
        "mixed_precision": str(accelerator.mixed_precision),
        "precision": dtype.metadata() | attention.metadata(),
        "versions": library_versions(
            ("lkg_pipeline", "torch", "transformers", "peft", "accelerate")
        ),
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.total_steps,
        "step": state.step,
        "finished": finished,
        "selection_metric": SELECTION_METRIC,
        "best_step": best["step"],
        "best_val": best["val"],
        "history": state.history,
        "wall_time_s": run.earlier_wall + time.perf_counter() - run.started,
        "train_tokens": state.train_tokens,
        "tokens_per_s": state.train_tokens / state.train_seconds
        if state.train_seconds > 0
        else None,
        "peak_rss_mb": _peak_rss_mb(),
    }


def training_function(
    config: TrainConfig,
    paths: RunPaths,
    resume: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    accelerator: Accelerator | None = None,
    restart_other_run: bool = False,
) -> TrainResult:
    """Fine-tune, validate, checkpoint and publish; `on_log` (main process only) receives every
    record that goes into the history, e.g. to forward it to Dagster Pipes."""
    from transformers import AutoConfig

    started = time.perf_counter()
    accelerator = accelerator if accelerator is not None else make_accelerator(config)
    model_config = AutoConfig.from_pretrained(paths.base_model)
    dtype = choose_dtype(config.dtype, accelerator.device.type, model_gemm_shape(model_config))
    accelerator.print(dtype.describe())
    attention = choose_attention(
        config.attention, dtype.torch_dtype, accelerator.device.type, model_config, True
    )
    accelerator.print(attention.describe())
    identity = _identity(config, paths, dtype)
    latest = _prepare_partial(accelerator, paths, identity, resume, restart_other_run)
    run, letter_ids, (n_trainable, n_total) = _prepare_run(
        config, paths, accelerator, dtype, attention.chosen, on_log, started
    )

    state = RunState()
    if latest is not None:
        accelerator.load_state(str(latest))
        state = RunState.load(latest)
        accelerator.print(f"resumed from {latest} at step {state.step}/{run.total_steps}")
    run.earlier_wall = state.wall_seconds
    best_file = run.best_dir / "best.json"
    run.best = json.loads(best_file.read_text()) if best_file.exists() else None
    where = layers_described(accelerator.unwrap_model(run.model))
    accelerator.print(
        f"LoRA on {list(config.target_modules)} ({where}): "
        f"{n_trainable:,} trainable of {n_total:,} params;"
        f" {len(run.train_dl.dataset)} train / {len(run.val.prompts)} val prompts; "
        f"{run.steps_per_epoch} steps per epoch; loss={config.loss}; "
        f"processes={accelerator.num_processes}"
    )
    if state.step == 0:
        run.validate(state)  # the untrained adapter (LoRA B = 0) is the base model: the baseline

    run.model.train()
    start_epoch, done_in_epoch = divmod(state.step, run.steps_per_epoch)
    for epoch in range(start_epoch, config.epochs):
        if state.step >= run.stop_at:
            break
        run.train_epoch(state, epoch, done_in_epoch if epoch == start_epoch else 0)
    if not state.validated_now():
        run.validate(state)  # e.g. a re-run after the last step, or a run with no training step

    best = run.best
    assert best is not None, f"{run.best_dir} holds no adapter: no validation ran"
    finished = state.step >= run.total_steps
    summary = _summary(run, state, identity, dtype, attention, letter_ids, (n_trainable, n_total))
    if accelerator.is_main_process:
        _publish(run.best_dir, paths.output, summary)
        if finished:  # nothing left to resume
            shutil.rmtree(paths.partial)
    accelerator.wait_for_everyone()
    accelerator.print(
        f"published {paths.output}: best step {best['step']} {SELECTION_METRIC} "
        f"{best['val'][SELECTION_METRIC]:.4f} ({'finished' if finished else 'stopped early'})"
    )
    accelerator.end_training()
    return TrainResult(
        paths.output,
        state.step,
        finished,
        best["step"],
        best["val"],
        state.history,
        summary,
        model=accelerator.unwrap_model(run.model),
    )


# ----------------------------------------------------------------------------- command line


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
