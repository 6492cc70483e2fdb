"""Runs sharing an instance: a step waiting for the `torch` pool's slot says who holds it, sleeps
and stops on SIGTERM; runs started together on a new instance do not race for its schema."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import psutil

from lkg_pipeline.instance_storage import open_instance
from lkg_pipeline_tests.dagster_cli import REPO, instance_env

HOLD = [sys.executable, "-m", "dagster", "asset", "materialize", "-m",
        "lkg_pipeline_tests.pool_code", "--select", "hold"]  # fmt: skip


def hold_for(seconds: float) -> list[str]:
    return [*HOLD, "--config-json", json.dumps({"ops": {"hold": {"config": {"seconds": seconds}}}})]


class Output:
    """A process's merged output, read as it comes."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.text += line

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            assert time.monotonic() < deadline, f"no {needle!r} in:\n{self.text[-3000:]}"
            time.sleep(0.2)


def start(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Output]:
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return process, Output(process)


def test_the_definitions_install_the_pool_wait() -> None:
    from dagster._core.execution.plan.instance_concurrency_context import (
        InstanceConcurrencyContext,
    )

    from lkg_pipeline.definitions import defs

    defs()
    assert getattr(InstanceConcurrencyContext, "_lkg_pool_wait", False)


def test_a_blocked_step_names_the_holder_sleeps_and_stops_on_sigterm(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    env = instance_env(home, tmp_path / "lake", (REPO / "dagster.yaml").read_text())
    holder, holder_out = start(hold_for(600), env)
    waiter = None
    try:
        holder_out.wait_for('STEP_START - Started execution of step "hold"', 120)
        with open_instance(home) as instance:
            [slot] = instance.event_log_storage.get_concurrency_info("torch").claimed_slots
        waiter, waiter_out = start(hold_for(0), env)
        waiter_out.wait_for("hold waits for a slot of pool 'torch'", 120)
        assert " - INFO - " in next(
            line for line in waiter_out.text.splitlines() if "waits for a slot" in line
        )
        assert f"run {slot.run_id} step hold (STARTED, pid {holder.pid})" in waiter_out.text
        assert "kill <pid>" in waiter_out.text  # how to stop a live holder
        assert "pool slots freed" not in waiter_out.text  # a live holder is left alone

        # waits without burning a core: Dagster alone polls flat out (~100% of a core)
        process = psutil.Process(waiter.pid)
        before = sum(process.cpu_times()[:2])
        time.sleep(6)
        used = sum(process.cpu_times()[:2]) - before
        assert used < 0.6, f"{used:.2f} s of CPU in 6 s of waiting"

        waiter.send_signal(signal.SIGTERM)
        assert waiter.wait(timeout=30) != 0
        with open_instance(home) as instance:
            info = instance.event_log_storage.get_concurrency_info("torch")
            assert [s.run_id for s in info.claimed_slots] == [slot.run_id]  # untouched
            runs = instance.get_runs(limit=1)
            assert runs[0].run_id != slot.run_id and runs[0].is_finished
    finally:
        for process in (waiter, holder):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def test_runs_started_together_on_a_hand_made_instance_both_succeed(tmp_path: Path) -> None:
    """A new DAGSTER_HOME with only the project's dagster.yaml, never migrated: its first
    users race to create the SQLite schema (Dagster's own storage failed in 4 of 4 tries of
    six processes, 3 times leaving the instance unusable); the project's storage takes a lock."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    env = os.environ | {"DAGSTER_HOME": str(home), "LKG_DATA_LAKE": str(tmp_path / "lake")}
    opened = "import dagster as dg; dg.DagsterInstance.get().get_runs(limit=1)"
    openers = [
        subprocess.Popen([sys.executable, "-c", opened], env=env, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    runs = [subprocess.Popen(hold_for(0), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE) for _ in range(2)]  # fmt: skip
    for process in openers + runs:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-2000:]
    with open_instance(home) as instance:
        finished = instance.get_runs()
        assert [r.status for r in finished] == [dg.DagsterRunStatus.SUCCESS] * 2
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"  # Dagster's files
