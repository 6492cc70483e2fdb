"""What a training run is made from: its settings (`TrainConfig`), its files (`RunPaths`), what it
returns (`TrainResult`), and the LoRA and Accelerator objects the settings define.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lkg_pipeline.core.llm.precision import DTYPES
from lkg_pipeline.core.llm.segments import ATTENTION_PATHS

if TYPE_CHECKING:
    from accelerate import Accelerator


LOSSES = ("letters", "lm")


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
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_examples", "max_val_examples", "max_steps", "lora_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
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
