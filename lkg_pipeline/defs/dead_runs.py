"""Runs whose process died are marked failed and their pool slots freed.

A run killed with SIGKILL (an OOM kill, a closed laptop, a power cut) never reports its end:
it stays STARTED in the instance and keeps its slot in the `torch` pool, so every later step
of that pool (retriever, candidates, lora_adapter, rankings, recommendations, hence `make
run`) waits for ever. Dagster frees such slots through run monitoring in its daemon, but CLI
runs (`dagster asset materialize`, what `make run` and CI use) have no daemon watching them,
and the CLI has no command to free a slot.

So every `make` target that materialises runs `python -m lkg_pipeline.defs.dead_runs` first
(it takes a second), and a user can run it by hand. A run is dead when the process that
started it (the pid of its RUN_START event) no longer exists, or exists but started after
the run did (the pid was reused). This needs the run to have started on this machine, which
holds for the SQLite instance this project sets up; a deployment on PostgreSQL with a daemon
uses Dagster's run monitoring instead (`run_monitoring` in dagster.yaml).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import dagster as dg
import psutil

# Statuses of a run that still claims to be alive.
LIVE_STATUSES = (
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
)
CLOCK_SLACK_S = 2.0  # a process's start time vs its run's first event, both on this machine


@dataclass(frozen=True)
class DeadRun:
    run_id: str
    job_name: str
    pid: int | None
    why: str


def _start(instance: dg.DagsterInstance, run_id: str) -> tuple[int | None, float | None]:
    """(pid, timestamp) of the run's RUN_START event; (None, None) before it started."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.RUN_START, limit=1
    ).records
    if not records:
        return None, None
    entry = records[0].event_log_entry
    return entry.dagster_event.pid if entry.dagster_event else None, entry.timestamp


def run_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid of the process that started the run (None before it started)."""
    return _start(instance, run_id)[0]


def _alive(pid: int, since: float) -> bool:
    """Whether `pid` is a process that was already running at `since` (not a reused pid)."""
    try:
        started = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    return started <= since + CLOCK_SLACK_S


def find_dead_runs(instance: dg.DagsterInstance) -> list[DeadRun]:
    """Runs that claim to be alive, or hold pool slots, whose process is gone."""
    live = instance.get_runs(filters=dg.RunsFilter(statuses=list(LIVE_STATUSES)))
    holders = instance.event_log_storage.get_concurrency_run_ids()
    candidates = {run.run_id: run for run in live}
    for run_id in holders - set(candidates):
        run = instance.get_run_by_id(run_id)
        if run is not None:
            candidates[run_id] = run
    dead = []
    for run_id, run in candidates.items():
        if run.is_finished:  # finished but still holding slots: nothing runs there
            dead.append(DeadRun(run_id, run.job_name, None, f"finished ({run.status.value})"))
            continue
        pid, since = _start(instance, run_id)
        if pid is None or since is None:
            continue  # queued or starting: not ours to judge
        if not _alive(pid, since):
            dead.append(DeadRun(run_id, run.job_name, pid, f"its process {pid} is gone"))
    return dead


def reap(instance: dg.DagsterInstance) -> list[DeadRun]:
    """Mark each dead run failed (it shows so in the UI) and free its pool slots."""
    dead = find_dead_runs(instance)
    for corpse in dead:
        run = instance.get_run_by_id(corpse.run_id)
        if run is not None and not run.is_finished:
            instance.report_run_failed(
                run, message=f"Marked failed by lkg_pipeline.defs.dead_runs: {corpse.why}."
            )
        instance.event_log_storage.free_concurrency_slots_for_run(corpse.run_id)
    return dead


def live_holders(instance: dg.DagsterInstance) -> list[str]:
    """One line per live run holding a pool slot: what a new run's steps of that pool wait
    for, and how to stop it."""
    lines = []
    for run_id in sorted(instance.event_log_storage.get_concurrency_run_ids()):
        run = instance.get_run_by_id(run_id)
        pid, _ = _start(instance, run_id)
        if run is None or run.is_finished:
            continue
        lines.append(
            f"run {run_id} ({run.job_name}, pid {pid}) holds a pool slot: steps of the same "
            f"pool in new runs wait until it ends (stop it: kill {pid})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list dead runs, change nothing")
    args = parser.parse_args(argv)
    with dg.DagsterInstance.get() as instance:
        dead = find_dead_runs(instance) if args.dry_run else reap(instance)
        waiting = live_holders(instance)
    verb = "found" if args.dry_run else "marked failed, pool slots freed"
    for corpse in dead:
        sys.stdout.write(f"dead run {corpse.run_id} ({corpse.job_name}): {corpse.why}: {verb}\n")
    for line in waiting:
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
