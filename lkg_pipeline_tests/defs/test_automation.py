"""Schedules, sensors and jobs, evaluated against an in-memory instance (nothing materialised).

Automation decides what runs unattended (weekly retraining, ingestion when files land, the
llm/evaluate follow-ups), so what each one requests, and when it stays quiet, is checked here
from reported events alone, in seconds.
"""

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.sensor_definition import SensorExecutionData

from lkg_pipeline.core.llm.prompts import VARIANTS
from lkg_pipeline.definitions import defs as load_defs
from lkg_pipeline.defs.resources import DataLake
from lkg_pipeline.defs.schedules import weekly_retrain
from lkg_pipeline.defs.sensors import (
    SETTLE_SECONDS,
    drop_folder_fingerprint,
    raw_files_sensor,
    retrain_followups,
)

MONDAY = datetime(2025, 6, 2, 3, 0, tzinfo=UTC)
FOLLOWUPS = {"prompts", "lora_adapter", "rankings", "evaluation_report", "recommendations"}


@pytest.fixture(scope="module")
def defs() -> dg.Definitions:
    return load_defs()


@pytest.fixture(scope="module")
def repo(defs: dg.Definitions) -> dg.RepositoryDefinition:
    """Needed by contexts whose requests name partitions (Dagster validates them)."""
    return defs.get_repository_def()


def report(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=asset, partition=partition)
    )


def dataset_variants(dataset: str) -> set[str]:
    return {dg.MultiPartitionKey({"dataset": dataset, "variant": v}) for v in VARIANTS}


# --- weekly_retrain -------------------------------------------------------------------------


@pytest.fixture
def persistent_instance() -> Iterator[dg.DagsterInstance]:
    """A schedule context can only reach a persistent instance (it keeps a ref, not the object)."""
    with dg.instance_for_test() as instance:
        yield instance


def test_weekly_retrain_is_off_by_default_and_runs_mondays() -> None:
    assert weekly_retrain.default_status == dg.DefaultScheduleStatus.STOPPED
    assert weekly_retrain.job_name == "retrain_dataset"
    assert (weekly_retrain.cron_schedule, weekly_retrain.execution_timezone) == ("0 3 * * 1", "UTC")


def test_weekly_retrain_requests_only_datasets_with_sequences_and_graph(
    persistent_instance: dg.DagsterInstance, repo: dg.RepositoryDefinition
) -> None:
    context = dg.build_schedule_context(
        instance=persistent_instance, scheduled_execution_time=MONDAY, repository_def=repo
    )
    nothing = weekly_retrain.evaluate_tick(context)
    assert not nothing.run_requests
    assert "no dataset" in (nothing.skip_message or "")

    report(persistent_instance, "sequences", "ml-100k")
    report(persistent_instance, "sequences", "beauty")  # stopped before the graph: not ready
    report(persistent_instance, "items", "ml-latest-small")  # another asset: not a sign of data
    assert weekly_retrain.evaluate_tick(context).skip_message is not None
    report(persistent_instance, "kg_triples", "ml-100k")
    tick = weekly_retrain.evaluate_tick(context)
    assert tick.skip_message is None
    assert len(tick.run_requests) == 1
    (request,) = tick.run_requests
    assert request.partition_key == "ml-100k"
    assert request.job_name in (None, "retrain_dataset")  # None: the schedule's own job
    assert request.tags["dagster/partition_set"] == "retrain_dataset_partition_set"
    assert "2025-06-02" in request.run_key and "ml-100k" in request.run_key


# --- raw_files_sensor -----------------------------------------------------------------------


def write(path: Path, text: str, age_s: float) -> None:
    """Write a file and date it `age_s` seconds ago (older than SETTLE_SECONDS: settled)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def tick(root: Path, cursor: str | None, repo: dg.RepositoryDefinition) -> SensorExecutionData:
    context = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(),
        cursor=cursor,
        resources={"lake": DataLake(root=str(root))},
        repository_def=repo,
    )
    return raw_files_sensor.evaluate_tick(context)


def test_raw_files_sensor_is_off_by_default() -> None:
    assert raw_files_sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert raw_files_sensor.job_name == "dataset_pipeline"


def test_raw_files_sensor_requests_new_and_changed_settled_files(
    tmp_path: Path, repo: dg.RepositoryDefinition
) -> None:
    drop = tmp_path / "sources" / "ml-latest-small"
    drop.mkdir(parents=True)
    (tmp_path / "sources" / "ml-100k").mkdir()
    empty = tick(tmp_path, None, repo)
    assert not empty.run_requests and empty.skip_message

    write(drop / "ratings.csv", "userId,movieId\n1,1\n", age_s=120)
    write(drop / "movies.csv", "movieId,title\n1,Toy Story\n", age_s=120)
    first = tick(tmp_path, empty.cursor, repo)
    assert [r.partition_key for r in first.run_requests] == ["ml-latest-small"]
    assert first.run_requests[0].tags["dagster/partition_set"] == "dataset_pipeline_partition_set"

    again = tick(tmp_path, first.cursor, repo)
    assert not again.run_requests and again.skip_message

    write(drop / "ratings.csv", "userId,movieId\n1,1\n2,1\n", age_s=90)
    changed = tick(tmp_path, again.cursor, repo)
    assert [r.partition_key for r in changed.run_requests] == ["ml-latest-small"]
    assert changed.run_requests[0].run_key != first.run_requests[0].run_key

    # A file still being copied (modified just now) holds its whole folder back, new or seen.
    write(drop / "tags.csv", "userId,movieId,tag\n", age_s=0)
    write(tmp_path / "sources" / "ml-100k" / "u.data", "1\t1\t5\t0\n", age_s=0)
    copying = tick(tmp_path, changed.cursor, repo)
    assert not copying.run_requests
    assert copying.cursor == changed.cursor


def test_drop_folder_fingerprint(tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    assert drop_folder_fingerprint(folder, time.time()) is None  # no folder
    write(folder / ".DS_Store", "x", age_s=120)
    assert drop_folder_fingerprint(folder, time.time()) is None  # hidden files only
    write(folder / "sub" / "a.csv", "a", age_s=0)
    mtime = (folder / "sub" / "a.csv").stat().st_mtime
    assert drop_folder_fingerprint(folder, mtime + SETTLE_SECONDS / 2) is None  # still copying
    settled = drop_folder_fingerprint(folder, mtime + SETTLE_SECONDS + 1)
    assert settled is not None
    assert drop_folder_fingerprint(folder, mtime + 3600) == settled  # same files, same digest
    write(folder / ".DS_Store", "changed", age_s=120)
    assert drop_folder_fingerprint(folder, mtime + 3600) == settled  # hidden files ignored
    (folder / "sub" / "a.csv").write_text("ab")
    os.utime(folder / "sub" / "a.csv", (mtime, mtime))
    assert drop_folder_fingerprint(folder, mtime + 3600) not in (None, settled)  # size changed


# --- retrain_followups (AutomationCondition.eager) ------------------------------------------


def test_retrain_followups_targets_llm_and_evaluate_but_not_base_model(
    defs: dg.Definitions,
) -> None:
    assert isinstance(retrain_followups, dg.AutomationConditionSensorDefinition)
    assert retrain_followups.default_status == dg.DefaultSensorStatus.STOPPED
    graph = defs.resolve_asset_graph()
    targets = retrain_followups.asset_selection.resolve(graph)
    assert {k.to_user_string() for k in targets} == FOLLOWUPS
    assert all(graph.get(k).automation_condition is not None for k in targets)


def evaluate(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    previous: dg.EvaluateAutomationConditionsResult | None = None,
) -> dg.EvaluateAutomationConditionsResult:
    return dg.evaluate_automation_conditions(
        defs=defs,
        instance=instance,
        asset_selection=retrain_followups.asset_selection,
        cursor=previous.cursor if previous is not None else None,
    )


def requested(result: dg.EvaluateAutomationConditionsResult) -> dict[str, set[str]]:
    found = {name: set(result.get_requested_partitions(dg.AssetKey(name))) for name in FOLLOWUPS}
    return {name: keys for name, keys in found.items() if keys}


def test_retrain_followups_request_prompts_after_the_selected_paths_update(
    defs: dg.Definitions,
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    for asset in ("candidates", "sequences", "items", "selected_paths"):
        report(instance, asset, "ml-100k")
    report(instance, "base_model")

    # eager() only reacts to changes after its first evaluation (which records the state).
    first = evaluate(defs, instance)
    assert first.total_requested == 0

    report(instance, "selected_paths", "ml-100k")  # a retrain finished
    second = evaluate(defs, instance, first)
    assert second.get_requested_partitions(dg.AssetKey("prompts")) == dataset_variants("ml-100k")
    # Adapters and rankings share the dataset × variant partitions: the same run follows them.
    # The report and recommendations wait (their other inputs were never materialised here).
    assert requested(second) == {
        "prompts": dataset_variants("ml-100k"),
        "lora_adapter": dataset_variants("ml-100k"),
        "rankings": dataset_variants("ml-100k"),
    }

    third = evaluate(defs, instance, second)  # nothing new: nothing requested twice
    assert third.total_requested == 0


def test_retrain_followups_report_waits_for_new_rankings(defs: dg.Definitions) -> None:
    instance = dg.DagsterInstance.ephemeral()
    upstream = ("candidates", "sequences", "items", "kg_triples", "retriever", "kg_paths")
    for asset in (
        *upstream,
        "preference_model",
        "selected_paths",
        "evaluation_report",
        "recommendations",
    ):
        report(instance, asset, "ml-100k")
    for asset in ("prompts", "lora_adapter", "rankings"):
        for key in dataset_variants("ml-100k"):
            report(instance, asset, key)
    report(instance, "base_model")
    first = evaluate(defs, instance)

    report(instance, "selected_paths", "ml-100k")  # a weekly retrain, everything evaluated before
    second = evaluate(defs, instance, first)
    assert second.get_requested_partitions(dg.AssetKey("rankings")) == dataset_variants("ml-100k")
    assert requested(second).keys() == {"prompts", "lora_adapter", "rankings"}

    for key in dataset_variants("ml-100k"):  # the new adapters and rankings land
        report(instance, "lora_adapter", key)
        report(instance, "rankings", key)
    third = evaluate(defs, instance, second)
    assert requested(third).keys() == {"evaluation_report", "recommendations"}
    assert third.get_requested_partitions(dg.AssetKey("evaluation_report")) == {"ml-100k"}


def test_retrain_followups_wait_for_missing_upstream(defs: dg.Definitions) -> None:
    instance = dg.DagsterInstance.ephemeral()
    for asset in ("candidates", "sequences", "items", "selected_paths"):
        report(instance, asset, "ml-100k")  # no base_model yet
    first = evaluate(defs, instance)
    report(instance, "selected_paths", "ml-100k")
    second = evaluate(defs, instance, first)
    assert second.total_requested == 0


# --- jobs -----------------------------------------------------------------------------------


def job_assets(defs: dg.Definitions, name: str) -> set[str]:
    job = defs.resolve_job_def(name)
    return {k.to_user_string() for k in job.asset_layer.selected_asset_keys}


def test_retrain_dataset_is_retrieval_and_paths(defs: dg.Definitions) -> None:
    assert job_assets(defs, "retrain_dataset") == {
        "retriever",
        "candidates",
        "kg_paths",
        "preference_model",
        "selected_paths",
    }


def test_dataset_pipeline_is_every_dataset_stage(defs: dg.Definitions) -> None:
    assets = job_assets(defs, "dataset_pipeline")
    assert {"raw_interactions", "sequences", "items", "kg_triples", "preference_model"} <= assets
    assert not assets & (FOLLOWUPS | {"base_model"})
    graph = defs.resolve_asset_graph()
    dataset_partitions = graph.get(dg.AssetKey("sequences")).partitions_def
    assert all(graph.get(dg.AssetKey(a)).partitions_def == dataset_partitions for a in assets)
