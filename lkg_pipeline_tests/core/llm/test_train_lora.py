"""The ranker's LoRA script on a tiny random Llama: learning, scoring, resuming, launching.

The synthetic task is learnable on purpose (the true item is always candidate "C"), so a
working loop must lower the loss and lift NDCG@10 above the untrained model's; a loop that
trained on the wrong ids or positions would not.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from lkg_pipeline.core.evaluate.metrics import rank_of_target, ranking_metrics
from lkg_pipeline.core.llm.model import LETTERS, letter_token_ids
from lkg_pipeline.core.llm.prompts import PROMPT_COLUMNS
from lkg_pipeline.core.llm.rank.fusion import retriever_log_prior
from lkg_pipeline.core.llm.rank.scoring import score_prompts
from lkg_pipeline.core.llm.train.config import RunPaths, TrainConfig, lora_config
from lkg_pipeline.core.llm.train.data import collate, read_examples
from lkg_pipeline.core.llm.train.loop import batch_loss, training_function
from lkg_pipeline.core.llm.train.script import build_parser, config_from_args
from lkg_pipeline_tests.pipes_launch import launched

REPO = Path(__file__).resolve().parents[3]
TARGET = 2  # the true item is always candidate "C"
ACCELERATE = Path(sys.executable).with_name("accelerate")
LAUNCH = [
    str(ACCELERATE), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "2",
    "-m", "lkg_pipeline.core.llm.train",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_prompts(n_train: int = 24, n_val: int = 8, seed: int = 0) -> pl.DataFrame:
    """Prompts in the pipeline's contract; histories vary in length so batches need padding."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * 4 + ["train", "val"]
    for i, split in enumerate(splits):
        candidates = rng.sample(range(1, 500), len(LETTERS))
        history = "\n".join(
            f"({j + 1}) item {rng.randint(1, 500)}" for j in range(rng.randint(1, 6))
        )
        pool = "\n".join(f"({letter}) item {c}" for letter, c in zip(LETTERS, candidates))
        prompt = f"Pick the item.\nHistory:\n{history}\nCandidate pool:\n{pool}\nAnswer:"
        missing = i >= len(splits) - 2  # the true item is not among the candidates
        rows.append(
            {
                "example_id": i,
                "user_idx": i,
                "split": split,
                "variant": "llamarec",
                "prompt": prompt,
                "candidate_item_idxs": candidates,
                "target_index": -1 if missing else TARGET,
                "n_tokens": len(prompt.split()),
            }
        )
    return pl.DataFrame(rows, schema=PROMPT_COLUMNS)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    synthetic_prompts().write_parquet(path)
    return path


def quick(**overrides: Any) -> TrainConfig:
    """Settings that learn the synthetic task in seconds: 24 prompts / (2 x 2) = 6 steps/epoch."""
    settings: dict[str, Any] = {
        "lr": 1e-2,
        "warmup_steps": 0,
        "epochs": 2,
        "batch_size": 2,
        "grad_accum": 2,
        "eval_every": 3,
        "log_every": 1,
        "checkpoint_every": 3,
        "max_val_examples": None,
        "eval_batch_size": 3,
        "dtype": "float32",  # exact comparisons below; bf16 has its own tests
    }
    return TrainConfig(**(settings | overrides))


def cli_args(paths: RunPaths, config: TrainConfig) -> list[str]:
    """The command line that rebuilds `config` (only the fields this file changes)."""
    args = ["--prompts", str(paths.prompts), "--base-model", str(paths.base_model)]
    args += ["--output", str(paths.output)]
    names = ["lr", "warmup_steps", "epochs", "batch_size", "grad_accum", "eval_every",
             "log_every", "checkpoint_every", "eval_batch_size", "max_steps", "loss",
             "dtype"]  # fmt: skip
    for name in names:
        args += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    return args + ["--max-val-examples", "none"]


def tokenizer_of(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_adapter(base: Path, adapter: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).eval()


def test_read_examples_keeps_rows_whose_target_is_a_candidate(prompts_file: Path) -> None:
    train = read_examples(prompts_file, "train", None, seed=0)
    assert len(train.prompts) == 24 and set(train.targets) == {TARGET}
    assert train.example_ids == sorted(train.example_ids)
    val = read_examples(prompts_file, "val", 5, seed=0)
    assert len(val.prompts) == 5 and val.example_ids == sorted(val.example_ids)
    assert read_examples(prompts_file, "val", 5, seed=0) == val  # the sample is seeded


def test_score_prompts_batched_equals_one_at_a_time(tiny_base: Path, prompts_file: Path) -> None:
    """Left padding with explicit positions: a prompt's scores do not depend on its batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    prompts = pl.read_parquet(prompts_file)["prompt"].to_list()[:7]
    lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) > 1, "the test needs prompts of different lengths"
    batched = score_prompts(model, tokenizer, prompts, batch_size=4)  # (7, 20)
    single = torch.cat([score_prompts(model, tokenizer, [p], batch_size=1) for p in prompts])
    assert batched.shape == (7, len(LETTERS))
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    # the scores are the next-token logits of the letter ids, read from a plain forward
    ids = tokenizer(prompts[0], return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]  # (V,)
    expected = logits[letter_token_ids(tokenizer, prompts[0])]
    torch.testing.assert_close(batched[0], expected, rtol=1e-4, atol=1e-5)


def test_fine_tune_learns_and_the_published_adapter_reloads(
    tiny_base: Path, prompts_file: Path, tmp_path: Path
) -> None:
    paths = RunPaths(prompts_file, tiny_base, tmp_path / "adapter")
    logged: list[dict[str, Any]] = []
    # Validation only at step 0 and at the end: the published best is then the final model.
    result = training_function(quick(eval_every=1000), paths, on_log=logged.append)

    assert result.finished and result.step == 12
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    val = {h["step"]: h["val"] for h in result.history if "val" in h}
    assert sorted(val) == [0, 12]
    assert val[12]["NDCG@10"] > val[0]["NDCG@10"] + 0.2, val
    assert result.best_step == 12 and result.best_val == val[12]
    assert [r["step"] for r in logged] == [0, *range(1, 13), 12]  # val, 12 losses, val

    # published atomically; the resumable partial folder is gone once all epochs are done
    assert not paths.partial.exists()
    assert (paths.output / "adapter_model.safetensors").exists()
    summary = json.loads((paths.output / "training.json").read_text())
    assert summary["best_step"] == 12 and summary["step"] == 12 and summary["finished"]
    assert summary["config"]["lr"] == 1e-2 and summary["n_train"] == 24 and summary["n_val"] == 8
    assert summary["tokens_per_s"] > 0 and summary["peak_rss_mb"] > 0
    assert summary["adapted_layers"] == "all 2 layers"
    tokenizer = tokenizer_of(tiny_base)
    val_prompts = read_examples(prompts_file, "val", None, seed=0).prompts
    assert summary["letter_token_ids"] == [letter_token_ids(tokenizer, val_prompts[0])]

    reloaded = load_adapter(tiny_base, paths.output)
    in_memory = score_prompts(result.model, tokenizer, val_prompts)
    from_disk = score_prompts(reloaded, tokenizer, val_prompts)
    torch.testing.assert_close(from_disk, in_memory, rtol=0, atol=0)
    assert bool((from_disk.argmax(dim=1) == TARGET).all())


class Interrupted(Exception):
    """Stands for a kill: raised from the log callback in the middle of training."""


def test_stop_crash_and_resume_continue_the_same_run(
    tiny_base: Path, prompts_file: Path, tmp_path: Path
) -> None:
    # No dropout: the resumed run must then reproduce the uninterrupted one exactly.
    config = quick(lora_dropout=0.0)
    reference = training_function(config, RunPaths(prompts_file, tiny_base, tmp_path / "ref"))
    paths = RunPaths(prompts_file, tiny_base, tmp_path / "adapter")

    # 1. stopped by max_steps: published, and the partial folder stays for a longer re-run
    first = training_function(quick(lora_dropout=0.0, max_steps=4), paths)
    assert first.step == 4 and not first.finished
    assert json.loads((paths.output / "training.json").read_text())["step"] == 4
    assert sorted(p.name for p in (paths.partial / "checkpoints").iterdir()) == ["step_4"]

    # a different run must not silently continue this one, nor silently discard it
    with pytest.raises(ValueError, match="different run"):
        training_function(quick(lora_dropout=0.0, lr=5e-3), paths)
    other = RunPaths(prompts_file, tiny_base, tmp_path / "other")
    shutil.copytree(paths.partial, other.partial)
    restarted = training_function(
        quick(lora_dropout=0.0, lr=5e-3, max_steps=2), other, restart_other_run=True
    )
    assert restarted.step == 2  # from step 0, not resumed from step 4
    assert json.loads((other.partial / "run.json").read_text())["config"]["lr"] == 5e-3

    # 2. killed at step 7 (after the step-6 checkpoint): the published adapter is untouched
    def kill_at_7(record: dict[str, Any]) -> None:
        if record["step"] == 7:
            raise Interrupted

    with pytest.raises(Interrupted):
        training_function(config, paths, on_log=kill_at_7)
    assert json.loads((paths.output / "training.json").read_text())["step"] == 4
    assert sorted(p.name for p in (paths.partial / "checkpoints").iterdir()) == ["step_6"]

    # 3. the same command again: continues from step 6, not from 0
    logged: list[dict[str, Any]] = []
    last = training_function(config, paths, on_log=logged.append)
    assert last.finished and last.step == 12
    assert logged[0]["step"] == 7, "the resumed run must not repeat steps 1..6"
    steps = [h["step"] for h in last.history]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 12
    losses = {h["step"]: h["loss"] for h in last.history if "loss" in h}
    expected = {h["step"]: h["loss"] for h in reference.history if "loss" in h}
    assert losses == pytest.approx(expected, rel=1e-5)
    assert (last.best_step, last.best_val) == (reference.best_step, reference.best_val)
    assert not paths.partial.exists()


def test_a_run_resumed_mid_epoch_with_dropout_reproduces_the_uninterrupted_one(
    tiny_base: Path, prompts_file: Path, tmp_path: Path
) -> None:
    """The loader drew its iterator seed from torch's global RNG: one more draw on resume
    shifted every later dropout mask."""
    config = quick(lora_dropout=0.05, epochs=1)
    reference = training_function(config, RunPaths(prompts_file, tiny_base, tmp_path / "ref"))
    paths = RunPaths(prompts_file, tiny_base, tmp_path / "adapter")

    def kill_at_5(record: dict[str, Any]) -> None:
        if record["step"] == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        training_function(config, paths, on_log=kill_at_5)
    assert sorted(p.name for p in (paths.partial / "checkpoints").iterdir()) == ["step_3"]
    logged: list[dict[str, Any]] = []
    resumed = training_function(config, paths, on_log=logged.append)
    assert logged[0]["step"] == 4  # resumed from the step-3 checkpoint
    losses = {h["step"]: h["loss"] for h in resumed.history if "loss" in h}
    expected = {h["step"]: h["loss"] for h in reference.history if "loss" in h}
    assert losses == pytest.approx(expected, rel=1e-6)


def test_settings_that_cannot_train_fail_and_leave_nothing_in_the_way(
    tiny_base: Path, prompts_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\), got 1.5"):
        quick(lora_dropout=1.5)
    paths = RunPaths(prompts_file, tiny_base, tmp_path / "adapter")
    # a typo beside a right name used to train q_proj alone
    with pytest.raises(ValueError, match=r"target_modules \['q_prj'\] name no module"):
        training_function(quick(target_modules=["q_prj", "v_proj"], max_steps=1), paths)
    # the failed run made no checkpoint: the corrected command starts, no "different run"
    fixed = training_function(quick(target_modules=["q_proj", "v_proj"], max_steps=1), paths)
    assert fixed.step == 1


def test_lm_loss_trains_and_unknown_loss_is_refused(
    tiny_base: Path, prompts_file: Path, tmp_path: Path
) -> None:
    result = training_function(
        quick(loss="lm", epochs=1, eval_every=1000),
        RunPaths(prompts_file, tiny_base, tmp_path / "lm"),
    )
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    assert result.best_val["NDCG@10"] >= result.history[0]["val"]["NDCG@10"]

    with pytest.raises(ValueError, match=r"'letters', 'lm'"):
        TrainConfig(loss="hinge")
    batch = {k: torch.zeros((1, 3), dtype=torch.long) for k in ("input_ids", "attention_mask")}
    batch["position_ids"] = torch.zeros((1, 3), dtype=torch.long)
    with pytest.raises(ValueError, match="choose one of"):
        batch_loss(result.model, batch, "hinge")


def test_lora_in_the_top_layers_only_trains_there_and_backward_stops_there(
    tiny_base: Path, prompts_file: Path, tmp_path: Path
) -> None:
    """lora_layers=1 on the 2-layer model: adapters only in the top layer, the bottom layer's
    output carries no autograd graph (nothing below is kept for backward), and it learns."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = quick(lora_layers=1, eval_every=1000, target_modules=("q_proj", "v_proj", "up_proj"))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
        lora_config(config, n_layers=2),
    )
    adapted = {
        n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_" in n
    }
    assert adapted == {"1"}
    seen: list[bool] = []
    layers = model.get_base_model().model.layers
    layers[0].register_forward_hook(lambda _m, _i, out: seen.append(out[0].requires_grad))
    layers[1].register_forward_hook(lambda _m, _i, out: seen.append(out[0].requires_grad))
    ids = torch.tensor([[5, 17, 300, 42]])
    model(input_ids=ids).logits.sum().backward()
    assert seen == [False, True]

    result = training_function(config, RunPaths(prompts_file, tiny_base, tmp_path / "top"))
    val = {h["step"]: h["val"] for h in result.history if "val" in h}
    assert val[12]["NDCG@10"] > val[0]["NDCG@10"] + 0.2, val
    saved = json.loads((tmp_path / "top" / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1]
    assert result.summary["adapted_layers"] == "layer 1 of 2"

    assert lora_config(quick(lora_layers=3), n_layers=2).layers_to_transform == [0, 1]
    with pytest.raises(ValueError, match="needs the model's number of decoder layers"):
        lora_config(quick(lora_layers=3))
    with pytest.raises(ValueError, match="lora_layers must be None or >= 1"):
        quick(lora_layers=0)


def with_retriever_scores(frame: pl.DataFrame, scores: np.ndarray) -> pl.DataFrame:
    return frame.with_columns(
        retriever_scores=pl.Series(scores.tolist(), dtype=pl.List(pl.Float32))
    )


def test_retriever_log_prior_is_a_log_softmax_that_keeps_masked_items_learnable() -> None:
    scores = np.array([[3.0, 1.0, -np.inf, 0.0], [0.0, 0.0, 0.0, 0.0]])
    prior = retriever_log_prior(scores)
    assert np.exp(prior).sum(axis=1) == pytest.approx([1.0, 1.0])
    assert prior[0, 2] == prior[0, 3] and np.isfinite(prior).all()  # -inf → the row's lowest
    assert prior[0, 0] - prior[0, 1] == pytest.approx(2.0)  # differences kept
    assert prior[1] == pytest.approx(np.full(4, -np.log(4)))


def test_retriever_prior_is_added_to_the_scores_in_the_loss_and_in_validation(
    tiny_base: Path, tmp_path: Path
) -> None:
    """The loss is CE over (retriever log-prior + LLM scores), validation ranks by the same
    sum; a flat prior (a constant shift) changes nothing, an informative one what it should."""
    frame = synthetic_prompts()
    rng = np.random.default_rng(0)
    informative = rng.normal(size=(frame.height, len(LETTERS)))
    informative[:, TARGET] += 4.0  # the retriever is mostly right about "C"
    prompts = tmp_path / "informative.parquet"
    with_retriever_scores(frame, informative).write_parquet(prompts)
    flat = tmp_path / "flat.parquet"
    with_retriever_scores(frame, np.full((frame.height, len(LETTERS)), 2.5)).write_parquet(flat)

    tokenizer = tokenizer_of(tiny_base)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    train = read_examples(prompts, "train", None, seed=0, with_prior=True)
    assert train.priors is not None and train.priors.shape == (24, len(LETTERS))
    rows = [
        {
            "input_ids": tokenizer(p)["input_ids"],
            "letter_ids": letter_token_ids(tokenizer, p),
            "target": t,
            "prior": prior,
        }
        for p, t, prior in zip(train.prompts[:3], train.targets, train.priors, strict=False)
    ]
    batch = collate(rows, int(tokenizer.pad_token_id or tokenizer.eos_token_id))
    raw = score_prompts(model, tokenizer, train.prompts[:3])  # (3, 20)
    expected = torch.nn.functional.cross_entropy(
        raw + torch.as_tensor(train.priors[:3], dtype=torch.float32), batch["target"]
    )
    with torch.no_grad():
        torch.testing.assert_close(batch_loss(model, batch, "letters"), expected)

    config = quick(epochs=1, eval_every=1000, retriever_prior=True)
    run = training_function(config, RunPaths(prompts, tiny_base, tmp_path / "prior"))
    val = read_examples(prompts, "val", None, seed=0, with_prior=True)
    fused = score_prompts(model, tokenizer, val.prompts) + torch.as_tensor(
        val.priors, dtype=torch.float32
    )  # step 0 is the untrained model
    ranks = rank_of_target(fused, torch.tensor(val.targets), tie_break="index").numpy()
    assert run.history[0]["val"] == pytest.approx(ranking_metrics(ranks.astype(float), (1, 5, 10)))

    shifted = training_function(config, RunPaths(flat, tiny_base, tmp_path / "flat"))
    alone = training_function(
        quick(epochs=1, eval_every=1000), RunPaths(flat, tiny_base, tmp_path / "alone")
    )
    losses = [[h["loss"] for h in r.history if "loss" in h] for r in (shifted, alone)]
    assert len(losses[0]) == 6
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert shifted.best_val == pytest.approx(alone.best_val)


def test_retriever_prior_needs_scores_and_a_per_candidate_loss(
    prompts_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"24 of 24 train prompts have no retriever scores"):
        read_examples(prompts_file, "train", None, seed=0, with_prior=True)
    assert read_examples(prompts_file, "train", None, seed=0).priors is None
    with pytest.raises(ValueError, match="retriever_prior needs loss 'letters'"):
        TrainConfig(loss="lm", retriever_prior=True)


def test_command_line_mirrors_the_config() -> None:
    required = ["--prompts", "p.parquet", "--base-model", "b", "--output", "o"]
    defaults = build_parser().parse_args(required)
    assert config_from_args(defaults) == TrainConfig()
    assert defaults.resume is True
    changed = "--target-modules q_proj k_proj --max-steps none --max-val-examples 7"
    args = build_parser().parse_args(
        [*required, *changed.split(), "--lora-dropout", "0", "--no-resume"]
    )
    config = config_from_args(args)
    assert config.target_modules == ("q_proj", "k_proj") and config.max_steps is None
    assert config.max_val_examples == 7 and config.lora_dropout == 0.0 and args.resume is False
    with pytest.raises(SystemExit):
        build_parser().parse_args([*required, "--loss", "hinge"])


def test_accelerate_launch_publishes_a_loadable_adapter(
    tiny_base: Path, prompts_file: Path, tmp_path: Path
) -> None:
    paths = RunPaths(prompts_file, tiny_base, tmp_path / "adapter")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    done = subprocess.run(
        [*LAUNCH, *cli_args(paths, quick(max_steps=3))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "step 3/12 | loss" in done.stdout
    summary = json.loads((paths.output / "training.json").read_text())
    assert summary["step"] == 3 and summary["num_processes"] == 1
    model = load_adapter(tiny_base, paths.output)
    scores = score_prompts(model, tokenizer_of(tiny_base), ["Candidate pool:\n(A) x\nAnswer:"])
    assert scores.shape == (1, len(LETTERS)) and bool(torch.isfinite(scores).all())


# Two CPU processes: `accelerate launch --cpu` needs mpirun for that, torchrun does not; the
# Accelerator then reads ACCELERATE_USE_CPU as accelerate's own launchers set it.
TORCHRUN_2 = [
    str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
    "-m", "lkg_pipeline.core.llm.train",
]  # fmt: skip


@pytest.mark.parametrize(
    ("launcher", "env", "processes"),
    [
        (LAUNCH, {}, 1),
        (TORCHRUN_2, {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, 2),
    ],
    ids=["accelerate-launch-1-process", "torchrun-2-processes"],
)
def test_under_dagster_pipes_only_rank_0_reports_once(
    tiny_base: Path,
    prompts_file: Path,
    tmp_path: Path,
    launcher: list[str],
    env: dict[str, str],
    processes: int,
) -> None:
    paths = RunPaths(prompts_file, tiny_base, tmp_path / "adapter")
    command = [*launcher, *cli_args(paths, quick(max_steps=3))]
    metadata, messages = launched("lora_adapter", command, env)
    assert metadata["steps"] == 3 and metadata["finished"] is False
    assert metadata["adapter"] == str(paths.output)
    assert 0 <= metadata["val_NDCG@10"] <= 1 and metadata["tokens_per_s"] > 0
    step_logs = [m for m in messages if '"loss"' in m and '"step": 3' in m]
    assert len(step_logs) == 1, messages[-20:]  # one report per step, from rank 0 only
    summary = json.loads((paths.output / "training.json").read_text())
    assert summary["num_processes"] == processes
    assert (paths.output / "adapter_model.safetensors").exists()
