"""After the paths, in bounded memory: the preference module, the path selection and the
prompts at growing numbers of Beauty-like users.

`kg_paths` writes its tables a batch of users at a time (benchmarks/paths/bench.py); the stages
after it read them the same way (`core.paths.batches.read_users`) and write their outputs in
parts that the IO manager concatenates into one file. This benchmark checks that on synthetic data
shaped like Amazon Beauty (built by the real KG builder, as paths/bench.py builds it): at each size,
the paths are enumerated with `write_paths`, then each stage runs in its own process as its asset
runs it. A stage first loads what the IO manager hands its asset (the candidates, sequences, titles,
preferences, a tokenizer): that process's RSS then is its baseline, "inputs"; the peak after it
(VmHWM, reset once the inputs are loaded) is what the stage adds.

The issue's bar: at 1M Beauty-like users each stage's peak stays within the inputs + 1 GB,
and time per user stays within 2× of the 10K figure.

    python -m benchmarks.paths.after_paths            # 10K, 100K and 1M users (~1.5 h on 2 cores)
    python -m benchmarks.paths.after_paths --quick    # two tiny sizes, seconds
    python -m benchmarks.paths.after_paths --stages preference --sizes 1000000 --data DIR
        # keep each size's data and paths in DIR/<users>, and reuse them on the next run:
        # the 1M build (~50 min) is most of a run that re-measures one stage
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from benchmarks.harness import (
    RESULTS_JSON,
    child_memory_limit_mb,
    current_rss_mb,
    lake_root,
    machine_info,
    peak_rss_mb,
    reset_peak_rss,
    run_isolated,
    save_results_section,
    table,
)
from benchmarks.paths.bench import QUICK_ITEMS, USERS_PER_BATCH

SHAPE = "beauty-like"
EXAMPLES_PER_BATCH = 10_000  # PromptRunConfig.examples_per_batch
STAGES = ("preference", "selection", "prompts")
# users → seconds one stage may take (build and write_paths get 2× that)
SIZES = {10_000: 900, 100_000: 1_800, 1_000_000: 4_800}
QUICK_SIZES = {40: 120, 120: 120}
BUDGET_MB = 1024  # the bar: a stage's peak within its inputs + 1 GB
HERE = Path(__file__).resolve().parent  # the topic folder: its pages and figures
OUT_MD = HERE / "AFTER_PATHS.md"


def _tokenizer_folder() -> str | None:
    """The lake's base model (its tokenizer counts the prompts' tokens), if materialised."""
    from lkg_pipeline.defs.layout import current_base_model

    try:
        return str(current_base_model(lake_root()))
    except FileNotFoundError:
        return None


def _phase(start_rss_mb: float) -> dict[str, float]:
    return {"rss_before_mb": start_rss_mb, "stage_peak_rss_mb": peak_rss_mb()}


def stage_preference(folder: str, users_per_batch: int) -> dict[str, Any]:
    """Child: what `preference_model` runs (both encoders, scores, metrics, preferences)."""
    from lkg_pipeline.core.paths.preference.training import fit_preferences

    src = Path(folder)
    candidates = pl.read_parquet(src / "examples.parquet")
    before = current_rss_mb()
    reset_peak_rss()
    tick = time.perf_counter()
    fitted = fit_preferences(candidates, src / "paths", "auto", users_per_batch=users_per_batch)
    out = src / "preference"
    out.mkdir(exist_ok=True)
    fitted.preferences.write_parquet(out / "preferences.parquet")
    seconds = time.perf_counter() - tick
    subset = fitted.report["preference"]["test"]["subset"]
    return {"seconds": seconds, **_phase(before), "test_subset_ndcg10": subset["NDCG@10"]}


def stage_selection(folder: str, users_per_batch: int) -> dict[str, Any]:
    """Child: what `selected_paths` runs, and the IO manager's concatenation of its parts."""
    from lkg_pipeline.core.io.storage import ParquetParts
    from lkg_pipeline.core.paths.selection import PathSelection, selections_in_batches

    src = Path(folder)
    preferences = pl.read_parquet(src / "preference" / "preferences.parquet")
    before = current_rss_mb()
    reset_peak_rss()
    tick = time.perf_counter()
    parts = ParquetParts(src / "selection-parts")
    for batch in selections_in_batches(
        src / "paths" / "paths.parquet", preferences, PathSelection(), users_per_batch
    ):
        parts.write(batch)
    parts.concatenate(src / "selected_paths.parquet")  # as the IO manager does
    parts.remove()
    seconds = time.perf_counter() - tick
    rows = pl.scan_parquet(src / "selected_paths.parquet").select(pl.len()).collect().item()
    return {"seconds": seconds, **_phase(before), "rows": rows}


def stage_prompts(folder: str, examples_per_batch: int, tokenizer: str) -> dict[str, Any]:
    """Child: what `prompts` runs for `lkg_rag` (segments format), and the concatenation."""
    from transformers import AutoTokenizer

    from lkg_pipeline.core.io.storage import ParquetParts
    from lkg_pipeline.core.llm.prompts import PromptConfig, prompts_in_batches, truncate_titles

    src = Path(folder)
    candidates = pl.read_parquet(src / "examples.parquet")
    sequences = pl.read_parquet(src / "sequences.parquet")
    items = pl.read_parquet(src / "items.parquet")
    counter = AutoTokenizer.from_pretrained(tokenizer)
    # the prompts asset's defaults (PromptRunConfig) for Beauty
    config = PromptConfig(
        item_noun="product", item_verb="buy", max_prompt_tokens=2048, format="segments"
    )
    titles = truncate_titles(
        dict(items.select("item_idx", "title").iter_rows()), counter, config.max_title_tokens
    )

    def count(text: str) -> int:
        return len(counter(text, add_special_tokens=False)["input_ids"])

    selected = pl.scan_parquet(src / "selected_paths.parquet")
    before = current_rss_mb()
    reset_peak_rss()
    tick = time.perf_counter()
    parts = ParquetParts(src / "prompt-parts")
    tokens = 0
    for batch in prompts_in_batches(
        candidates, sequences, titles, selected, "lkg_rag", config, count, examples_per_batch
    ):
        parts.write(batch)
        tokens += int(batch["n_tokens"].sum())
    parts.concatenate(src / "prompts.parquet")  # as the IO manager does
    parts.remove()
    seconds = time.perf_counter() - tick
    return {
        "seconds": seconds,
        **_phase(before),
        "prompts": candidates.height,
        "mean_tokens": tokens / max(candidates.height, 1),
        "output_mb": (src / "prompts.parquet").stat().st_size / 2**20,
    }


BUILT_FILE = "built.json"  # written last by build_with_paths: the folder is complete


def build_with_paths(folder: str, n_users: int, quick: bool) -> dict[str, Any]:
    """Child: the synthetic dataset (as paths/bench.py builds it, plus its items) and its paths;
    `BUILT_FILE` records what was built once all of it is written."""
    from benchmarks.paths.bench import build_synthetic, measure_enumerate

    stats = build_synthetic(SHAPE, n_users, folder, QUICK_ITEMS[SHAPE] if quick else None)
    n_items = json.loads((Path(folder) / "meta.json").read_text())["n_items"]
    pl.DataFrame(  # the titles synthetic_items gives its items
        {"item_idx": range(n_items), "title": [f"Synthetic item {i}" for i in range(n_items)]},
        schema={"item_idx": pl.Int32, "title": pl.String},
    ).write_parquet(Path(folder) / "items.parquet")
    paths = measure_enumerate(folder, 20 if quick else USERS_PER_BATCH)
    built = {**stats, "write_paths_s": paths["seconds"], "paths_rows": paths["paths_rows"]}
    (Path(folder) / BUILT_FILE).write_text(json.dumps({**built, "quick": quick}))
    return built


def _kept_build(folder: Path, n_users: int, quick: bool) -> dict[str, Any] | None:
    """What a complete earlier build in `folder` built, if it was this size and kind."""
    try:
        built = json.loads((folder / BUILT_FILE).read_text())
    except FileNotFoundError:
        return None
    return built if (built.get("users"), built.get("quick")) == (n_users, quick) else None


def run(
    quick: bool,
    tokenizer: str | None = None,
    only_sizes: list[int] | None = None,
    only_stages: list[str] | None = None,
    data: Path | None = None,
) -> dict[str, Any]:
    """Every size smallest first, each stage in its own process; stop at the first failure.
    `tokenizer`: a model folder whose tokenizer counts the prompts' tokens (default: the lake's
    base model); `only_sizes`, `only_stages`: measure these sizes, these stages only (a
    stage still runs, unrecorded, where a later one reads its output); `data`: keep each
    size's built data in `data`/<users> and reuse a complete one instead of building again."""
    assert not set(only_stages or ()) - set(STAGES), f"stages are {STAGES}, not {only_stages}"
    recorded = [s for s in STAGES if not only_stages or s in only_stages]
    stages = STAGES[: STAGES.index(recorded[-1]) + 1]  # each reads the one before's output
    sizes = QUICK_SIZES if quick else SIZES
    if only_sizes:
        unknown = set(only_sizes) - set(sizes)
        assert not unknown, f"sizes {sorted(unknown)} not in {sorted(sizes)}"
        sizes = {n: limit for n, limit in sizes.items() if n in only_sizes}
    tokenizer = tokenizer or _tokenizer_folder()
    memory_limit_mb = child_memory_limit_mb()
    rows: list[dict[str, Any]] = []
    stopped = ""
    for n_users, limit_s in sizes.items():
        if stopped:
            rows.append({"users": n_users, "status": f"not run: {stopped}"})
            continue
        if data is None:
            folder = tempfile.mkdtemp(prefix=f"lkg_after_paths_{n_users}_")
        else:
            folder = str(data / str(n_users))
            Path(folder).mkdir(parents=True, exist_ok=True)
        try:
            built = _kept_build(Path(folder), n_users, quick)
            if built is None:
                print(
                    f"after paths: {n_users:,} users: building the data and its paths …",
                    flush=True,
                )
                made = run_isolated(
                    "benchmarks.paths.after_paths:build_with_paths",
                    {"folder": folder, "n_users": n_users, "quick": quick},
                    timeout_s=2 * limit_s,
                    memory_limit_mb=memory_limit_mb,
                )
                if not made.ok:
                    stopped = f"building {n_users:,} users: {made.status} ({made.error[:300]})"
                    rows.append({"users": n_users, "status": stopped})
                    continue
                built = made.result
            else:
                print(
                    f"after paths: {n_users:,} users: reusing the data built in {folder}",
                    flush=True,
                )
            base = {
                "users": n_users,
                "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "cpu_model": machine_info()["cpu_model"],
                **{k: built[k] for k in ("examples", "paths_rows")},
            }
            kwargs = {
                "preference": {"users_per_batch": 20 if quick else USERS_PER_BATCH},
                "selection": {"users_per_batch": 20 if quick else USERS_PER_BATCH},
                "prompts": {
                    "examples_per_batch": 50 if quick else EXAMPLES_PER_BATCH,
                    "tokenizer": tokenizer,
                },
            }
            for stage in stages:
                row = {**base, "stage": stage}
                if stage in recorded:
                    rows.append(row)
                if stage == "prompts" and tokenizer is None:
                    row["status"] = "not run: no base_model in the lake (its tokenizer counts)"
                    continue
                print(f"  {stage} …", flush=True)
                measured = run_isolated(
                    f"benchmarks.paths.after_paths:stage_{stage}",
                    {"folder": folder, **kwargs[stage]},
                    timeout_s=limit_s,
                    memory_limit_mb=memory_limit_mb,
                )
                if not measured.ok:
                    stopped = f"{stage} at {n_users:,} users: {measured.status}"
                    row["status"] = f"{stopped} ({measured.error[:300]})"
                    if stage not in recorded:  # a failed prerequisite is still reported
                        rows.append(row)
                    break
                result = measured.result
                added = result["stage_peak_rss_mb"] - result["rss_before_mb"]
                row |= {
                    "status": "ok",
                    **result,
                    "ms_per_user": 1e3 * result["seconds"] / n_users,
                    "added_mb": added,
                    "within_budget": added <= BUDGET_MB,
                }
                print(
                    f"    {result['seconds']:,.1f} s ({row['ms_per_user']:.3f} ms/user), inputs "
                    f"{result['rss_before_mb']:,.0f} MB, peak +{added:,.0f} MB",
                    flush=True,
                )
        finally:
            if data is None:
                shutil.rmtree(folder, ignore_errors=True)
    return {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "shape": SHAPE,
        "budget_mb": BUDGET_MB,
        "memory_limit_mb": memory_limit_mb,
        "rows": rows,
        "verdict": verdict(rows),
    }


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage: within budget at the largest size, and time per user largest / smallest."""
    out: dict[str, Any] = {}
    for stage in STAGES:
        done = [r for r in rows if r.get("stage") == stage and r.get("status") == "ok"]
        if not done:
            continue
        small, large = done[0], done[-1]
        out[stage] = {
            "largest_users": large["users"],
            "added_mb_at_largest": large["added_mb"],
            "within_budget_at_largest": large["within_budget"],
            "time_per_user_ratio": large["ms_per_user"] / small["ms_per_user"],
        }
    return out


def to_markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        "# After the paths: preference module, path selection and prompts in bounded memory",
        "",
        f"*Last run {result['measured_at']} on {machine['cpu_model']} ({machine['nproc']} "
        f"CPUs, {machine['ram_gib']} GiB, load {machine['load_average_1m']} at the start); "
        "each row names when and where it was measured. `python -m benchmarks.paths.after_paths`.*",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        "Inputs: the RSS once the stage's inputs are loaded; peak added: its high-water mark "
        f"above that. Bar: at most {result['budget_mb']:,} MB added.",
        "",
    ]
    shown = []
    for r in result["rows"]:
        shown.append(
            {
                "users": f"{r['users']:,}",
                "measured": ", ".join(r[k] for k in ("measured_at", "cpu_model") if k in r),
                "stage": r.get("stage", ""),
                "examples": f"{r['examples']:,}" if "examples" in r else "",
                "paths rows": f"{r['paths_rows']:,}" if "paths_rows" in r else "",
                "time": f"{r['seconds']:,.1f} s" if "seconds" in r else "",
                "per user": f"{r['ms_per_user']:.3f} ms" if "ms_per_user" in r else "",
                "inputs": f"{r['rss_before_mb']:,.0f} MB" if "rss_before_mb" in r else "",
                "peak added": f"{r['added_mb']:,.0f} MB" if "added_mb" in r else "",
                "status": r["status"] if r.get("within_budget", True) else "over the bar",
            }
        )
    lines += [table(shown), ""]
    for stage, v in result["verdict"].items():
        lines.append(
            f"- {stage}: at {v['largest_users']:,} users peak +{v['added_mb_at_largest']:,.0f} MB "
            f"({'within' if v['within_budget_at_largest'] else 'over'} the bar); time per user "
            f"×{v['time_per_user_ratio']:.2f} of the smallest size"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paths.after_paths")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--stages",
        default="",
        help=f"comma-separated stages to re-measure (of {', '.join(STAGES)}); the other "
        "stages' rows are kept from results.json",
    )
    parser.add_argument(
        "--sizes",
        default="",
        help="comma-separated user counts to re-measure; the other sizes' rows are kept from "
        "results.json",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="folder that keeps each size's built data and paths (in <users>/) and reuses a "
        "complete earlier build; default: a temporary folder, removed after each size",
    )
    args = parser.parse_args(argv)
    only = [int(n) for n in args.sizes.split(",") if n]
    stages = [s for s in args.stages.split(",") if s]
    result = run(args.quick, only_sizes=only, only_stages=stages, data=args.data)
    if (only or stages) and not args.quick and RESULTS_JSON.exists():
        before = json.loads(RESULTS_JSON.read_text()).get("after_paths", {})
        kept = before.get("rows", [])
        for r in kept:  # a row from before rows named their CPU gets its run's
            r.setdefault("cpu_model", before.get("machine", {}).get("cpu_model", "?"))
        remeasured = {(r["users"], r.get("stage")) for r in result["rows"]}
        sizes = {users for users, _ in remeasured}
        rows = [  # a re-measured size keeps no old stop ("not run", a failed build)
            r
            for r in kept
            if (r["users"], r.get("stage")) not in remeasured
            and not (r["users"] in sizes and "stage" not in r)
        ]
        rows += result["rows"]
        result["rows"] = sorted(
            rows, key=lambda r: (r["users"], STAGES.index(r.get("stage", STAGES[0])))
        )
        result["verdict"] = verdict(result["rows"])
    markdown = to_markdown(result)
    print(markdown)
    if not args.quick:
        OUT_MD.write_text(markdown)
        save_results_section(RESULTS_JSON, "after_paths", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
