"""The run configuration of the LLM stages reaches every setting of the core it wraps."""

import dataclasses

from lkg_pipeline.core.train_lora import TrainConfig, build_parser, config_from_args
from lkg_pipeline.defs.llm import LoraRunConfig


def test_every_training_setting_is_reachable_from_the_run_configuration() -> None:
    missing = {f.name for f in dataclasses.fields(TrainConfig)} - set(LoraRunConfig.model_fields)
    assert not missing, f"TrainConfig fields with no LoraRunConfig field: {sorted(missing)}"


def test_the_launch_arguments_rebuild_the_configured_training() -> None:
    config = LoraRunConfig(
        target_modules=["q_proj", "down_proj"], max_val_examples=None, lr=3e-4, dtype="float32"
    )
    args = build_parser().parse_args(
        ["--prompts", "p", "--base-model", "b", "--output", "o", *config.script_args()]
    )
    rebuilt = config_from_args(args)
    expected = {
        name: getattr(config, name) for name in (f.name for f in dataclasses.fields(TrainConfig))
    }
    expected["target_modules"] = tuple(expected["target_modules"])
    assert rebuilt == TrainConfig(**expected)
