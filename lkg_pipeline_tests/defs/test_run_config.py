"""Each stage's run configuration reaches every setting of the core it wraps, with the
core's defaults or declared differences."""

import dataclasses

import pytest

from lkg_pipeline.core.data.prepare import PrepareConfig
from lkg_pipeline.core.evaluate.compare import EvaluationConfig
from lkg_pipeline.core.evaluate.recommend import RecommendConfig
from lkg_pipeline.core.kg.graph import KGConfig
from lkg_pipeline.core.llm.prompts import PromptConfig
from lkg_pipeline.core.llm.train.config import TrainConfig
from lkg_pipeline.core.llm.train.script import build_parser, config_from_args
from lkg_pipeline.core.paths.enumeration import PathConfig
from lkg_pipeline.core.paths.preference.model import PreferenceConfig
from lkg_pipeline.core.paths.selection import PathSelection
from lkg_pipeline.core.retrieval.seqrec import RetrieverConfig
from lkg_pipeline.defs.evaluate import EvaluationRunConfig, RecommendationRunConfig
from lkg_pipeline.defs.kg import KGRunConfig
from lkg_pipeline.defs.llm import LoraRunConfig, PromptRunConfig
from lkg_pipeline.defs.paths import PathRunConfig, PreferenceRunConfig, SelectedPathsRunConfig
from lkg_pipeline.defs.prepare import PrepareRunConfig
from lkg_pipeline.defs.retrieval import RetrieverRunConfig
from lkg_pipeline.defs.run_config import core_differences


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
    assert config.to_core() == rebuilt  # what the benchmarks train with (pipeline_recipe)


PAIRS = [
    (KGRunConfig, KGConfig),
    (PrepareRunConfig, PrepareConfig),
    (RetrieverRunConfig, RetrieverConfig),
    (PathRunConfig, PathConfig),
    (PreferenceRunConfig, PreferenceConfig),
    (SelectedPathsRunConfig, PathSelection),
    (PromptRunConfig, PromptConfig),
    (LoraRunConfig, TrainConfig),
    (RecommendationRunConfig, RecommendConfig),
    (EvaluationRunConfig, EvaluationConfig),
]


def core_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


@pytest.mark.parametrize(("run_config", "core"), PAIRS, ids=lambda c: c.__name__)
def test_each_core_setting_is_reachable_with_the_cores_default_or_a_declared_one(
    run_config, core
) -> None:
    """One source of truth per setting: a run configuration field takes the core's default
    unless the difference is declared with its reason (`differs_from_core`), and a core field
    it does not offer is declared in NOT_EXPOSED."""
    differences = core_differences(run_config)
    not_exposed = getattr(run_config, "NOT_EXPOSED", {})
    fields = {f.name: f for f in dataclasses.fields(core)}
    missing = set(fields) - set(run_config.model_fields)
    assert missing == set(not_exposed), f"{run_config.__name__}: undeclared {missing}"
    differ = set()
    for name in set(fields) & set(run_config.model_fields):
        ours = run_config.model_fields[name].default
        theirs = core_default(fields[name])
        if (list(theirs) if isinstance(theirs, tuple) else theirs) != ours:
            differ.add(name)
    assert differ == set(differences), f"{run_config.__name__}: undeclared defaults {differ}"
    assert all(reason.strip() for reason in (*differences.values(), *not_exposed.values()))


def test_the_retriever_takes_the_datasets_tuned_defaults_unless_a_run_sets_them() -> None:
    from lkg_pipeline.defs.retrieval import DEFAULT_MAX_LEN, TUNED

    tuned = RetrieverRunConfig().to_core("ml-100k", n_items=50)
    for name, value in TUNED["ml-100k"].items():
        assert getattr(tuned, name) == value, name
    chosen = RetrieverRunConfig(architecture="lrurec", max_len=120, dropout=0.3)
    mine = chosen.to_core("ml-100k", n_items=50)
    assert (mine.architecture, mine.max_len, mine.dropout) == ("lrurec", 120, 0.3)
    assert set(TUNED["ml-100k"]) <= set(RetrieverRunConfig.DATASET_DEFAULTS)
    for name in RetrieverRunConfig.DATASET_DEFAULTS:  # None is what lets TUNED apply
        assert RetrieverRunConfig.model_fields[name].default is None, name
    with pytest.raises(ValueError, match="architecture: 'gru4rec' is not one of"):
        RetrieverRunConfig(architecture="gru4rec").to_core("ml-100k", n_items=50)
    published = RetrieverRunConfig().to_core("beauty", n_items=50)  # not searched yet
    assert published == RetrieverConfig(n_items=50, max_len=DEFAULT_MAX_LEN["beauty"])
    # the asset's run config, as JSON, round-trips to the same core config
    again = RetrieverRunConfig.model_validate_json(chosen.model_dump_json(exclude_unset=True))
    assert again.to_core("ml-100k", n_items=50) == mine


def test_a_negative_bad_line_tolerance_is_refused_at_configuration() -> None:
    """-1 used to reach the reader and fail a clean file with '0 malformed line(s)'."""
    import pydantic

    from lkg_pipeline.defs.ingest import IngestConfig

    with pytest.raises(pydantic.ValidationError, match="max_bad_lines"):
        IngestConfig(max_bad_lines=-1)
