"""`make bench`: every benchmark in one process, ratios side by side, and a Markdown summary.

    python -m benchmarks.run            # real ml-100k data lake → benchmarks/RESULTS.md + plot
    python -m benchmarks.run --quick    # tiny synthetic inputs, seconds; writes to a temp folder
    python -m benchmarks.run --only paths,ranking

The end-to-end measurement (`make run` cold, then with nothing changed) takes most of an hour,
so it is its own command, `python -m benchmarks.end_to_end` (`make bench-e2e`); RESULTS.md
includes the figures it last saved in `benchmarks/end_to_end.json`.

Ratios are only meaningful between numbers measured in the same run on the same machine, so
every comparison (ours vs the reference's approach, achieved FLOP/s vs the matmul ceiling) is
measured here together, and the machine is written next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import end_to_end, paths_bench, ranking_bench, training_bench
from benchmarks.common import REPO, MissingLakeData, ceiling, machine_info, require_lake, si, table

BENCHMARKS: dict[str, tuple[Callable[..., dict], Callable[[dict], str], tuple[str, ...]]] = {
    # name → (run, to_markdown, data-lake files the full run reads)
    "paths": (paths_bench.run, paths_bench.to_markdown, ("kg", "candidates", "sequences")),
    "ranking": (ranking_bench.run, ranking_bench.to_markdown, ("prompts", "base_model")),
    "training": (training_bench.run, training_bench.to_markdown, ("prompts", "base_model")),
}


def headlines(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per comparison, the figures a reader looks for first."""
    lines = []
    if "paths" in results:
        c = results["paths"]["comparison"]
        lines.append(
            f"paths: ours {c['ours_s']:.2f} s for all {c['users']:,} users vs networkx "
            f"{c['networkx_all_paths_extrapolated_s']:,.0f} s all paths ≤2 hops "
            f"(×{c['speedup_vs_all_paths']:,.0f}) / {c['networkx_shortest_extrapolated_s']:,.1f} s "
            f"one shortest path (×{c['speedup_vs_shortest']:,.1f}), networkx extrapolated from "
            f"{c['sample_pairs']:,} of {c['pairs_all_examples']:,} pairs"
        )
        for r in results["paths"]["scaling"]:
            if r.get("status") == "ok":
                lines.append(
                    f"paths scaling: {r['shape']}, {r['users']:,} users: {r['seconds']:.2f} s "
                    f"({r['ms_per_user']:.3f} ms/user), peak RSS {r['peak_rss_mb']:,.0f} MB"
                )
            else:
                lines.append(
                    f"paths scaling: {r['shape']}, {r['users']:,} users: {r.get('status', '')}"
                )
    if "ranking" in results:
        for r in results["ranking"]["policies"]:
            lines.append(
                f"ranking: {r['policy']}: {r['prompts_per_s']:.3f} prompts/s "
                f"(×{r['speedup_vs_batch_1']:.2f} vs batch 1), {si(r['flops_per_s'], 'FLOP/s')} "
                f"= {100 * r['share_of_matmul']:.1f}% of matmul"
            )
    if "training" in results:
        for r in results["training"]["variants"]:
            if r["status"] != "ok":
                lines.append(f"training: {r['variant']}: {r['status']}")
                continue
            rss = f"{r['peak_rss_mb']:,.0f} MB" if r["peak_rss_mb"] else "n/a"
            lines.append(
                f"training: {r['variant']}: {r['tokens_per_s']:,.0f} tok/s "
                f"(×{r['speed_vs_letters']:.2f} vs letters), "
                f"{100 * r['share_of_matmul']:.1f}% of matmul, peak RSS {rss}"
            )
    return lines


def report(
    machine: dict[str, Any],
    matmul: dict[str, Any],
    results: dict[str, dict[str, Any]],
    seconds: dict[str, float],
    quick: bool,
    saved_end_to_end: dict[str, Any] | None = None,
) -> str:
    """RESULTS.md: the machine, the headlines, then each benchmark's own section."""
    rows = [{"": k, "value": v} for k, v in machine.items()]
    rows.append(
        {
            "": "fp32 matmul ceiling",
            "value": f"{si(matmul['flops_per_s'], 'FLOP/s')} ({matmul['n']}², best of "
            f"{matmul['repeats']}, {matmul['threads']} threads)",
        }
    )
    text = [
        "# Benchmark results" + (" (quick mode: tiny synthetic inputs)" if quick else ""),
        "",
        "Written by `make bench` (`python -m benchmarks.run"
        + (" --quick" if quick else "")
        + "`); every ratio compares numbers measured in this one run. What each benchmark "
        "measures: `benchmarks/README.md`.",
        "",
        "## Machine",
        "",
        table(rows),
        "",
        "## Headlines",
        "",
        *[f"- {line}" for line in headlines(results)],
        "",
        "Wall time per benchmark: "
        + ", ".join(f"{name} {s:,.0f} s" for name, s in seconds.items())
        + ".",
    ]
    for name, result in results.items():
        text += ["", BENCHMARKS[name][1](result)]
    if saved_end_to_end is not None:
        text += ["", end_to_end.to_markdown(saved_end_to_end)]
    return "\n".join(text) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny synthetic inputs, seconds")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {list(BENCHMARKS)}"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="folder for RESULTS.md and the plot (default: benchmarks/, a temp folder if --quick)",
    )
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    if not args.quick:
        try:  # before anything is timed: a missing lake fails now, not after minutes
            require_lake(*sorted({f for name in selected for f in BENCHMARKS[name][2]}))
        except MissingLakeData as error:
            print(f"make bench: {error}", file=sys.stderr)
            return 2
    out_dir = args.output or (
        Path(tempfile.mkdtemp(prefix="lkg_bench_quick_")) if args.quick else REPO / "benchmarks"
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    machine = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), flush=True)
    matmul = ceiling(args.quick)
    print(f"fp32 matmul ceiling: {si(matmul['flops_per_s'], 'FLOP/s')}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for name in selected:
        print(f"\n== {name} ==", flush=True)
        tick = time.perf_counter()
        results[name] = BENCHMARKS[name][0](quick=args.quick, out_dir=out_dir)
        seconds[name] = time.perf_counter() - tick

    print("\n== side by side ==")
    for line in headlines(results):
        print(line)
    target = out_dir / "RESULTS.md"
    saved = None
    if not args.quick and end_to_end.RESULT_FILE.exists():
        saved = json.loads(end_to_end.RESULT_FILE.read_text())
    target.write_text(report(machine, matmul, results, seconds, args.quick, saved))
    (out_dir / "results.json").write_text(
        json.dumps(
            {"machine": machine, "matmul": matmul, "results": results}, indent=2, default=str
        )
    )
    print(f"\nwrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
