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

from benchmarks import end_to_end
from benchmarks.harness import (
    REPO,
    MissingLakeData,
    ceiling,
    machine_info,
    require_lake,
    si,
    table,
    with_saved_sections,
)
from benchmarks.llm import ranking, training
from benchmarks.paths import bench as paths_bench
from benchmarks.retrieval import bench as retriever_bench

BENCHMARKS: dict[str, tuple[Callable[..., dict], Callable[[dict], str], tuple[str, ...]]] = {
    # name → (run, to_markdown, data-lake files the full run reads)
    "paths": (paths_bench.run, paths_bench.to_markdown, ("kg", "candidates", "sequences")),
    "ranking": (ranking.run, ranking.to_markdown, ("prompts", "base_model")),
    "training": (training.run, training.to_markdown, ("prompts", "base_model")),
    "retriever": (retriever_bench.run, retriever_bench.to_markdown, ("sequences",)),
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
    if "retriever" in results:
        for r in results["retriever"]["rows"]:
            if r["status"] != "ok":
                lines.append(f"retriever: {r['size']}: {r['status']}")
                continue
            lines.append(
                f"retriever: {r['size']}, {r['users']:,} users × {r['items']:,} items: one "
                f"training epoch {r['epoch_s']:,.0f} s; candidates for all users "
                f"{r['ours_all_users_s']:,.1f} s vs {r['old_all_users_s']:,.1f} s with the whole "
                f"score matrix (×{r['retrieval_speedup']:.1f}; scores held: "
                f"{r['ours_score_batch_mb']:,.0f} MB vs {r['old_score_matrix_gb']:,.1f} GB)"
            )
    return lines


def report(
    machine: dict[str, Any],
    matmul: dict[str, Any],
    results: dict[str, dict[str, Any]],
    seconds: dict[str, float],
    quick: bool,
    saved_end_to_end: dict[str, Any] | None = None,
    earlier: dict[str, dict[str, Any]] | None = None,
) -> str:
    """RESULTS.md: the machine, the headlines, then each benchmark's own section.

    earlier: benchmark → the machine of the earlier run its result comes from (`--only`
    re-measures some benchmarks and keeps the others); those sections say when they ran.
    """
    earlier = earlier or {}
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
        + ", ".join(
            f"{name} {s:,.0f} s" if s == s else f"{name} (earlier run)"  # NaN: not recorded
            for name, s in seconds.items()
        )
        + ".",
    ]
    if earlier:
        text += [
            "",
            "Sections marked *earlier run* were kept from a previous `make bench`; `--only` "
            "re-measured the others. Ratios inside a section always come from one run.",
        ]
    for name, result in results.items():
        section = BENCHMARKS[name][1](result)
        if name in earlier:
            m = earlier[name]
            heading, _, body = section.partition("\n")
            section = (
                f"{heading}\n\n*Earlier run: measured {m.get('date_utc', 'at an unknown date')} "
                f"(load average {m.get('load_average_1m', '?')} at the start).*\n{body}"
            )
        text += ["", section]
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
    runs = {name: {"machine": machine, "seconds": seconds[name]} for name in results}
    earlier: dict[str, dict[str, Any]] = {}
    if set(selected) != set(BENCHMARKS):  # keep what this run did not re-measure
        kept_results, kept_runs = saved_results(out_dir / "results.json", selected)
        earlier = {name: run["machine"] for name, run in kept_runs.items()}
        results = {n: results.get(n, kept_results.get(n)) for n in BENCHMARKS}
        results = {n: r for n, r in results.items() if r is not None}
        runs = {n: runs.get(n, kept_runs.get(n)) for n in results}
        seconds = {n: runs[n]["seconds"] for n in results}
    saved = None
    if not args.quick and end_to_end.RESULT_FILE.exists():
        saved = json.loads(end_to_end.RESULT_FILE.read_text())
    text = report(machine, matmul, results, seconds, args.quick, saved, earlier)
    payload = {"machine": machine, "matmul": matmul, "results": results, "runs": runs}
    if not args.quick:  # and the sections other commands own (`make quality`, `make sanity`, …)
        payload = with_saved_sections(out_dir / "results.json", payload)
    for name, content in (
        ("RESULTS.md", text),
        ("results.json", json.dumps(payload, indent=2, default=str)),
    ):
        # written next to the target, then renamed: an interrupted write never loses the old one
        partial = out_dir / f".{name}.partial"
        partial.write_text(content)
        partial.replace(out_dir / name)
    print(f"\nwrote {out_dir / 'RESULTS.md'}")
    return 0


def saved_results(
    path: Path, selected: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(results, runs) of the benchmarks not in `selected` from an earlier results.json."""
    if not path.exists():
        return {}, {}
    saved = json.loads(path.read_text())
    legacy = {"machine": saved.get("machine", {}), "seconds": float("nan")}  # one run for all
    results = {n: r for n, r in saved.get("results", {}).items() if n not in selected}
    runs = {n: saved.get("runs", {}).get(n, legacy) for n in results}
    return results, runs


if __name__ == "__main__":
    raise SystemExit(main())
