"""A step waiting for a pool slot sleeps between checks and says, at INFO, who holds the slot.

Steps of the `torch` pool (retriever, lora_adapter, rankings, recommendations) take one slot
each, one at a time per instance (dagster.yaml). Dagster 1.13's executors wait for a slot in a
loop whose sleep, `InstanceConcurrencyContext.interval_to_next_pending_claim_check`, is
`min(0, seconds until the next check)`, never positive: the waiting process polls the instance
flat out, 100% of a core taken from the step it waits for, and the only word of it is
"Step blocked by limit for pool torch" at DEBUG. No setting changes either, so `install`
replaces that one method with the interval it means (`max(0, …)`: Dagster's own back-off
of 1 s growing to 15 s between checks) and, the first time a step is refused a slot, logs
which runs hold the pool, their pids and how to free them. A holder whose process is gone
(a run killed with SIGKILL never releases its slot) is marked failed and its slot freed
(`dead_runs.reap`, on a SQLite instance, whose runs all start on this machine) when the wait
begins and every REAP_EVERY_S after, so a direct `dagster asset materialize` after a kill
runs without a manual step, as `make` does. A waiting process sleeps; Dagster notes a
SIGINT/SIGTERM that arrives meanwhile but acts on it only once the step can start, so the wait
loop acts on it at once: the run ends as interrupted and gives up its place in the queue.
`lkg_pipeline.definitions` calls `install` as it loads, so every run of the code location
(CLI, UI, daemon) has it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.execution.plan.active import ActiveExecution, _pool_key_for_step
from dagster._core.execution.plan.instance_concurrency_context import (
    InstanceConcurrencyContext,
)
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._utils.interrupts import pop_captured_interrupt

from lkg_pipeline.defs.dead_runs import reap, run_pid

SIGNAL_CHECK_S = 1.0
REAP_EVERY_S = 10.0


def _interval_to_next_pending_claim_check(self: InstanceConcurrencyContext) -> float:
    timeouts = getattr(self, "_pending_timeouts", {})
    if not getattr(self, "_pending_claims", None) or not timeouts:
        return 0.0
    now = time.time()
    # at most a second: the loop wakes to see a SIGTERM (it polls the instance only when
    # Dagster's back-off has run out)
    return max(0.0, min(SIGNAL_CHECK_S, *(ready_at - now for ready_at in timeouts.values())))


def holders_message(instance: dg.DagsterInstance, pool: str, step_key: str) -> str:
    """Who holds `pool`'s slots, and how to free them, for a step that waits for one."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    lines = [
        f"{step_key} waits for a slot of pool '{pool}' (limit {info.limit}); it starts when a "
        "holder's step ends. Holders:"
    ]
    for slot in info.claimed_slots:
        run = instance.get_run_by_id(slot.run_id)
        pid = run_pid(instance, slot.run_id)
        status = run.status.value if run is not None else "unknown run"
        lines.append(f"  run {slot.run_id} step {slot.step_key} ({status}, pid {pid})")
    lines.append(
        "A holder whose process is gone is marked failed and its slot freed while this step "
        "waits (as `python -m lkg_pipeline.defs.dead_runs` does). A live one: wait, or stop it "
        f"(kill <pid>). More slots: `dagster instance concurrency set {pool} N`."
    )
    return "\n".join(lines)


def install() -> None:
    """Patch the wait once per process (idempotent)."""
    if getattr(InstanceConcurrencyContext, "_lkg_pool_wait", False):
        return
    original_events = ActiveExecution.concurrency_event_iterator

    def concurrency_event_iterator(self: ActiveExecution, plan_context: Any) -> Iterator[Any]:
        yield from original_events(self, plan_context)
        waiting = self._instance_concurrency_context
        if waiting is None or not waiting.has_pending_claims():
            return
        if pop_captured_interrupt():  # Dagster would look only once the step could start
            raise DagsterExecutionInterruptedError(
                f"interrupted while {', '.join(waiting.pending_claim_steps())} waited for a "
                "pool slot"
            )
        # holders whose process is gone (SIGKILL, OOM) would be waited for for ever: free
        # their slots, at the first wait and then every REAP_EVERY_S. Only on a SQLite
        # instance, whose runs all start on this machine: a pid says nothing about a run that
        # another host started (a PostgreSQL deployment uses Dagster's run monitoring).
        last = self.__dict__.get("_lkg_reaped_at", 0.0)
        local = isinstance(plan_context.instance.run_storage, SqliteRunStorage)
        if local and time.monotonic() - last >= REAP_EVERY_S:
            self._lkg_reaped_at = time.monotonic()
            try:
                for corpse in reap(plan_context.instance):
                    plan_context.log.info(
                        f"run {corpse.run_id} marked failed and its pool slots freed: {corpse.why}"
                    )
            except Exception as error:  # never stop the waiting run over it
                plan_context.log.warning(f"could not check the pool's holders: {error}")
        told = self.__dict__.setdefault("_lkg_told", set())
        for step_key in waiting.pending_claim_steps():
            if step_key in told:
                continue
            told.add(step_key)
            pool = _pool_key_for_step(self.get_step_by_key(step_key)) or "?"
            try:
                message = holders_message(plan_context.instance, pool, step_key)
            except Exception as error:  # a report must never stop the run it reports on
                message = f"{step_key} waits for a slot of pool '{pool}' ({error})"
            plan_context.log.info(message)

    ActiveExecution.concurrency_event_iterator = concurrency_event_iterator  # type: ignore[method-assign]
    InstanceConcurrencyContext.interval_to_next_pending_claim_check = (  # type: ignore[method-assign]
        _interval_to_next_pending_claim_check
    )
    InstanceConcurrencyContext._lkg_pool_wait = True  # type: ignore[attr-defined]
