"""A run's files: what it was made from, resumable checkpoints, the best adapter so far, and the
published adapter.

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

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lkg_pipeline.core.data.sources import sha256_of
from lkg_pipeline.core.io.fingerprints import folder_digest
from lkg_pipeline.core.io.storage import replace_atomically, replace_dir_atomically
from lkg_pipeline.core.llm.precision import DtypeChoice
from lkg_pipeline.core.llm.train.config import RunPaths, TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


ADAPTER_STATE = "adapter_state.safetensors"  # LoRA weights inside an accelerate checkpoint


# Fields that may change between a run and its resumption: they decide how long it runs and
# how often it reports, not what it computes.
RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "log_every", "eval_batch_size")


def run_identity(config: TrainConfig, paths: RunPaths, dtype: DtypeChoice) -> dict[str, Any]:
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


def prepare_partial(
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
    # a run that failed before its first checkpoint left nothing to resume or to protect
    if resume and run_file.exists() and _checkpoints(paths.partial / "checkpoints"):
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


def register_adapter_only_state(accelerator: Accelerator) -> None:
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


def save_checkpoint(
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


def save_best(accelerator: Accelerator, model: Any, folder: Path, info: dict[str, Any]) -> None:
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


def publish(best: Path, output: Path, summary: dict[str, Any]) -> None:
    def write(staging: Path) -> None:
        for item in best.iterdir():
            if item.is_file() and item.name != "best.json":
                shutil.copy2(item, staging / item.name)
        (staging / "training.json").write_text(json.dumps(summary, indent=2))

    replace_dir_atomically(output, write)


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
