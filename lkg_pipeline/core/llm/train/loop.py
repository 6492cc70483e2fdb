"""The training loop (accelerate's `training_function`): model, data and optimizer prepared once,
then train, validate (keeping the best adapter), checkpoint, and publish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from lkg_pipeline.core.evaluate.metrics import rank_of_target, ranking_metrics
from lkg_pipeline.core.io.fingerprints import library_versions
from lkg_pipeline.core.llm.lowrank import folded
from lkg_pipeline.core.llm.model import final_hidden, fuse_rms_norms, token_logits
from lkg_pipeline.core.llm.precision import DtypeChoice, choose_dtype, model_gemm_shape
from lkg_pipeline.core.llm.rank.scoring import max_positions, score_prompts
from lkg_pipeline.core.llm.segments import (
    AttentionChoice,
    choose_attention,
    segment_scores,
    use_segment_attention,
)
from lkg_pipeline.core.llm.train.checkpoints import (
    RunState,
    prepare_partial,
    publish,
    register_adapter_only_state,
    run_identity,
    save_best,
    save_checkpoint,
)
from lkg_pipeline.core.llm.train.config import (
    LOSSES,
    RunPaths,
    TrainConfig,
    TrainResult,
    layers_described,
    lora_config,
    make_accelerator,
)
from lkg_pipeline.core.llm.train.data import Examples, get_dataloaders
from lkg_pipeline.core.llm.train.lora_dropout import use_word_dropout

if TYPE_CHECKING:
    from accelerate import Accelerator


SELECTION_METRIC = "NDCG@10"  # the adapter kept is the one with the best value of this on val


EVAL_KS = (1, 5, 10)


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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
            save_best(self.accelerator, self.model, self.best_dir, self.best)

    def checkpoint(self, state: RunState) -> None:
        state.wall_seconds = self.earlier_wall + time.perf_counter() - self.started
        root = self.paths.partial / "checkpoints"
        save_checkpoint(self.accelerator, root, state.step, dataclasses.asdict(state))

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
    # peft fails only when no name matches: a typo beside a right name would train without it
    adapted = {name.rsplit(".", 1)[-1] for name in model.targeted_module_names}
    unmatched = sorted(set(config.target_modules) - adapted)
    if unmatched:
        raise ValueError(
            f"target_modules {unmatched} name no module of {paths.base_model} (adapted: "
            f"{sorted(adapted)})"
        )
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
    register_adapter_only_state(accelerator)
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
        "base_model_sha256": identity["base_model_sha256"],  # what `rankings` checks
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
    identity = run_identity(config, paths, dtype)
    latest = prepare_partial(accelerator, paths, identity, resume, restart_other_run)
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
        publish(run.best_dir, paths.output, summary)
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
