"""Partitions in parallel: the steps that keep every core busy share one concurrency pool, and
the project's instance settings (dagster.yaml) let one of them run at a time.

Two runs of one process started in threads deadlock inside Dagster's in-process execution
(tried 2026-12-01), so the queueing itself is Dagster's, not tested here."""

import shutil
from pathlib import Path

import dagster as dg

from lkg_pipeline.defs.evaluate import rankings, recommendations
from lkg_pipeline.defs.llm import lora_adapter
from lkg_pipeline.defs.resources import TORCH_POOL
from lkg_pipeline.defs.retrieval import candidates, retriever
from lkg_pipeline.instance_storage import open_instance

REPO = Path(__file__).resolve().parents[2]


def test_the_training_and_ranking_steps_are_in_the_torch_pool() -> None:
    for asset in (retriever, candidates, lora_adapter, rankings, recommendations):
        assert asset.op.pool == TORCH_POOL, asset.key


def project_instance(home: Path) -> dg.DagsterInstance:
    """An instance in `home` with the repository's dagster.yaml, as `make` sets one up."""
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    return open_instance(home)


def test_the_project_instance_limits_the_pool_to_one_step(tmp_path: Path) -> None:
    instance = project_instance(tmp_path)
    pool = instance.get_concurrency_config().pool_config
    assert pool.default_pool_limit == 1 and pool.pool_granularity.value == "op"
    assert instance.event_log_storage.supports_global_concurrency_limits
    instance.dispose()
