"""`make run` end to end: from an empty data lake, then again with nothing changed.

    python -m benchmarks.end_to_end            # the real main command, ~20 min on 2 CPU cores
    python -m benchmarks.end_to_end --quick    # 20 users, tiny-random model, ~2 min

Runs the README's main command (`make run`) twice against a fresh data lake and Dagster
instance (temporary folders; the repository's `data_lake/` is not touched) and reports, per
Dagster step, its wall time (STEP_START → STEP_SUCCESS in the instance's event log), the peak
RSS of the whole process tree while it ran (CLI, any step worker, `accelerate launch` and its
children, sampled every `--interval` seconds) and which assets reused their previous outputs
(`reused_from` in the materialisation's metadata). Not part of `make bench`: the cold run alone
takes ~20 min; the figures it writes to `benchmarks/end_to_end.json` appear in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from benchmarks.harness import REPO, lake_root, machine_info, table, tree_rss
from lkg_pipeline.instance_storage import open_instance

RESULT_FILE = REPO / "benchmarks" / "end_to_end.json"
# `make run`'s variables (Makefile) for --quick: every stage on a 20-user sample, tiny model.
QUICK = {
    "DATASET_CONFIG": {
        "prepared_tables": {"config": {"max_users": 20}},
        "retriever": {"config": {"max_epochs": 2}},
        "preference_model": {"config": {"epochs": 3}},
    },
    "BASE_CONFIG": {"base_model": {"config": {"source": "tiny-random"}}},
    "LLM_CONFIG": {
        "lora_adapter": {
            "config": {
                "max_steps": 2,
                "grad_accum": 2,
                "max_train_examples": 8,
                "max_val_examples": 4,
                "warmup_steps": 0,
            }
        }
    },
    "REPORT_CONFIG": {"recommendations": {"config": {"variant": "lkg_rag"}}},
}


def make_run(
    lake: Path, home: Path, variables: dict[str, str], log: Path, interval: float
) -> dict[str, Any]:
    """`make run` with LKG_DATA_LAKE and DAGSTER_HOME pointed at `lake` and `home`."""
    env = os.environ | {"LKG_DATA_LAKE": str(lake)}
    # On make's command line: it overrides the Makefile's DAGSTER_HOME (an environment
    # variable would not).
    settings = {"DAGSTER_HOME": str(home), **variables}
    command = ["make", "--no-print-directory", "run", *(f"{k}={v}" for k, v in settings.items())]
    samples: list[tuple[float, int]] = []
    start = time.time()
    with log.open("a") as out:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(child.pid)
        while child.poll() is None:
            samples.append((time.time(), tree_rss(watched)))
            time.sleep(interval)
    end = time.time()
    if child.returncode != 0:
        raise RuntimeError(
            f"make run failed (exit {child.returncode}); its output ends:\n"
            + log.read_text()[-4000:]
        )
    return {"start": start, "end": end, "wall_s": end - start, "samples": samples}


def step_rows(home: Path, run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per Dagster step of the runs started during `run`: wall, peak RSS, reused assets."""
    from dagster import DagsterEventType

    rows = []
    with open_instance(home) as instance:
        records = sorted(
            (
                r
                for r in instance.get_run_records()
                if r.create_timestamp.timestamp() >= run["start"]
            ),
            key=lambda r: r.create_timestamp,
        )
        for record in records:
            steps: dict[str, dict[str, Any]] = {}
            for entry in instance.all_logs(record.dagster_run.run_id):
                event = entry.dagster_event
                if event is None or entry.step_key is None:
                    continue
                step = steps.setdefault(entry.step_key, {"assets": [], "reused": []})
                if event.event_type == DagsterEventType.STEP_START:
                    step["start"] = entry.timestamp
                elif event.event_type in (
                    DagsterEventType.STEP_SUCCESS,
                    DagsterEventType.STEP_FAILURE,
                ):
                    step["end"] = entry.timestamp
                elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                    materialization = event.event_specific_data.materialization
                    name = materialization.asset_key.to_user_string()
                    step["assets"].append(name)
                    if "reused_from" in materialization.metadata:
                        step["reused"].append(name)
            partition = record.dagster_run.tags.get("dagster/partition", "")
            for key, step in steps.items():
                if "start" not in step or "end" not in step:
                    continue
                window = [rss for t, rss in run["samples"] if step["start"] <= t <= step["end"]]
                rows.append(
                    {
                        "step": key,
                        "partition": partition,
                        "assets": step["assets"],
                        "reused": step["reused"],
                        "start": step["start"],
                        "seconds": step["end"] - step["start"],
                        "peak_rss_mb": max(window, default=0) / 2**20,
                    }
                )
    return sorted(rows, key=lambda r: r["start"])


def measure(
    quick: bool, interval: float, keep: Path | None, wheel_dir: Path | None = None
) -> dict[str, Any]:
    variables = {k: json.dumps({"ops": v}) for k, v in QUICK.items()} if quick else {}
    work = Path(tempfile.mkdtemp(prefix="lkg_e2e_"))
    lake, home = work / "lake", work / "dagster_home"
    (lake / "cache").mkdir(parents=True)
    home.mkdir()
    # The wheels are fetched with pip in a real cold run; a quick run reuses the repository's
    # copies when it has them, so it needs no network.
    source_cache = wheel_dir or lake_root() / "cache"
    if quick and source_cache.is_dir():
        for wheel in source_cache.glob("*.whl"):
            shutil.copy(wheel, lake / "cache" / wheel.name)
    log = work / "make_run.log"
    try:
        runs = {}
        for label in ("cold", "nothing changed"):
            print(f"make run ({label}) …", flush=True)
            run = make_run(lake, home, variables, log, interval)
            steps = step_rows(home, run)
            peak = max((rss for _, rss in run["samples"]), default=0) / 2**20
            runs[label] = {"wall_s": run["wall_s"], "peak_rss_mb": peak, "steps": steps}
            reused = [a for s in steps for a in s["reused"]]
            print(f"  {run['wall_s']:.0f} s, peak RSS {peak:,.0f} MB, reused: {reused}")
    finally:
        if keep is not None:
            shutil.copytree(work, keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "machine": machine_info(),
        "quick": quick,
        "command": "make run" + "".join(f" {k}='{v}'" for k, v in variables.items()),
        "runs": runs,
    }


def _rss(mb: float) -> str:
    return f"{mb:,.0f} MB" if mb > 0 else "-"  # "-": over before the first sample


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def to_markdown(result: dict[str, Any]) -> str:
    cold, warm = result["runs"]["cold"], result["runs"]["nothing changed"]
    warm_by_step = {(s["step"], s["partition"]): s for s in warm["steps"]}
    rows = []
    for step in cold["steps"]:
        again = warm_by_step.get((step["step"], step["partition"]), {})
        rows.append(
            {
                "step (assets)": f"`{step['step']}`"
                + (f" ({', '.join(step['assets'])})" if len(step["assets"]) > 1 else ""),
                "partition": step["partition"] or "-",
                "cold": _minutes(step["seconds"]),
                "cold peak RSS": _rss(step["peak_rss_mb"]),
                "nothing changed": _minutes(again["seconds"]) if again else "-",
                "peak RSS": _rss(again["peak_rss_mb"]) if again else "-",
                "reused": "yes" if again.get("reused") else "recomputed",
            }
        )
    rows.append(
        {
            "step (assets)": "**`make run`, total** (incl. CLI start-up)",
            "partition": "",
            "cold": f"**{_minutes(cold['wall_s'])}**",
            "cold peak RSS": f"**{cold['peak_rss_mb']:,.0f} MB**",
            "nothing changed": f"**{_minutes(warm['wall_s'])}**",
            "peak RSS": f"**{warm['peak_rss_mb']:,.0f} MB**",
            "reused": "",
        }
    )
    m = result["machine"]
    return "\n".join(
        [
            "## End to end (`benchmarks/end_to_end.py`)",
            "",
            f"`{result['command']}` from an empty data lake and Dagster instance, then again with "
            f"nothing changed; measured {m['date_utc']} on {m['nproc']} × {m['cpu_model']}, "
            f"{m['ram_gib']} GiB. Step times are the event log's STEP_START → STEP_SUCCESS; "
            "peak RSS is the whole process tree (CLI, any step worker, `accelerate launch` and its "
            'children) sampled while the step ran. "reused": the asset found its inputs, '
            "settings, code and outputs unchanged and kept its outputs (`reused_from` in its "
            "metadata); the other steps are cheap and run again.",
            "",
            table(rows),
            "",
            f"Nothing changed: ×{cold['wall_s'] / warm['wall_s']:.1f} faster than cold. A step "
            'shown as "-" ended before the first RSS sample of its window.',
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 users and a tiny random model")
    parser.add_argument("--interval", type=float, default=1.0, help="RSS sampling period (s)")
    parser.add_argument("--output", type=Path, default=None, help=f"default: {RESULT_FILE}")
    parser.add_argument("--keep", type=Path, default=None, help="copy the lake and logs here")
    args = parser.parse_args(argv)
    if shutil.which("make") is None:
        print("end_to_end: `make` is not installed", file=sys.stderr)
        return 2
    result = measure(args.quick, args.interval, args.keep)
    output = args.output or (
        Path(tempfile.mkdtemp(prefix="lkg_e2e_out_")) / "end_to_end.json"
        if args.quick
        else RESULT_FILE
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str))
    print(to_markdown(result))
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
