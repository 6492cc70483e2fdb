"""A run killed with SIGKILL mid-step does not wedge the instance: the next run succeeds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from lkg_pipeline.instance_storage import open_instance
from lkg_pipeline_tests.dagster_cli import MATERIALIZE, REPO, instance_env

DATASET = ["--select", "group:ingest or group:prepare", "--partition", "ml-100k"]
# Long enough to be killed mid-step: a retriever of many epochs on 40 users.
SLOW = {"ops": {"retriever": {"config": {"max_epochs": 20_000, "patience": 20_000}}}}
QUICK = {"ops": {"retriever": {"config": {"max_epochs": 1}}}}
SAMPLE = {"ops": {"prepared_tables": {"config": {"max_users": 40}}}}


def materialize_retriever(env: dict[str, str], config: dict) -> list[str]:
    return [
        *MATERIALIZE, "--select", "retriever", "--partition", "ml-100k",
        "--config-json", json.dumps(config),
    ]  # fmt: skip


def wait_for_step(home: Path, env: dict[str, str], timeout: float = 240) -> None:
    """Until some run's retriever step has started (holding the torch pool's slot)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open_instance(home) as instance:
            if instance.event_log_storage.get_concurrency_run_ids():
                return
        time.sleep(1)
    raise AssertionError("the retriever step never claimed its pool slot")


def test_a_killed_run_is_marked_failed_and_frees_its_slot(lake: Path, tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    env = instance_env(home, lake, (REPO / "dagster.yaml").read_text())
    prepared = subprocess.run(
        [*MATERIALIZE, *DATASET, "--config-json", json.dumps(SAMPLE)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stdout[-2000:]

    victim = subprocess.Popen(
        materialize_retriever(env, SLOW), env=env, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_step(home, env)
        time.sleep(2)  # inside the step: training
        with open_instance(home) as instance:  # alive: said, not reaped
            [run] = instance.get_runs(filters=dg.RunsFilter(job_name="__ASSET_JOB"), limit=1)
        alive = subprocess.run(
            [sys.executable, "-m", "lkg_pipeline.defs.dead_runs"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert alive.stdout == (
            f"run {run.run_id} (__ASSET_JOB, pid {victim.pid}) holds a pool slot: steps of the "
            f"same pool in new runs wait until it ends (stop it: kill {victim.pid})\n"
        )
    finally:
        os.kill(victim.pid, signal.SIGKILL)  # what an OOM kill does
        victim.wait(timeout=30)
    with open_instance(home) as instance:
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        assert instance.event_log_storage.get_concurrency_run_ids() == {run.run_id}

    reaped = subprocess.run(
        [sys.executable, "-m", "lkg_pipeline.defs.dead_runs"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert reaped.returncode == 0, reaped.stderr
    assert f"dead run {run.run_id}" in reaped.stdout and "is gone" in reaped.stdout
    with open_instance(home) as instance:
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert not instance.event_log_storage.get_concurrency_run_ids()

    again = subprocess.run(  # the same step, no manual step in between: it runs
        materialize_retriever(env, QUICK), env=env, cwd=REPO,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-2000:]
    assert (lake / "models" / "retriever" / "ml-100k" / "model.safetensors").exists()
    nothing = subprocess.run(
        [sys.executable, "-m", "lkg_pipeline.defs.dead_runs", "--dry-run"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert nothing.returncode == 0 and nothing.stdout == ""  # live or finished runs are left
