"""What every benchmark shares, whichever topic folder it is in: where the real data is (the
lake's files), the machine (CPU model and flags), the matmul ceiling, measurements in a child
process, and its section of benchmarks/results.json.

Peak memory is measured in a child process because the figure people want ("how much RAM does
this need") includes DuckDB's and torch's native allocations, which `tracemalloc` never sees,
and because a process's RSS high-water mark only ever goes up: measured in the parent, the
second benchmark would inherit the first one's peak. The child reports the kernel's
high-water mark of its own address space, `VmHWM` in /proc/self/status. Not `ru_maxrss`
(nor the parent's `RUSAGE_CHILDREN`, which is the children's `ru_maxrss`): Linux carries it
over fork and exec, so a child of a 400 MB parent reports at least 400 MB however little it
uses. The parent also samples the child's RSS with psutil, to stop a size that does not fit
before it starves the machine.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import psutil

from lkg_pipeline.core.io.storage import replace_atomically
from lkg_pipeline.core.io.tables import markdown_table

REPO = Path(__file__).resolve().parents[1]
RESULTS_JSON = REPO / "benchmarks" / "results.json"  # one section per benchmark
DATASET = "ml-100k"
VARIANT = "lkg_rag"
BASE_MODEL = "smollm2-135m"


def lake_root() -> Path:
    """The data lake the pipeline wrote (LKG_DATA_LAKE moves it, as for the pipeline)."""
    return Path(os.environ.get("LKG_DATA_LAKE", REPO / "data_lake")).expanduser().resolve()


@dataclass(frozen=True)
class LakeFiles:
    """The real artefacts of `make run` that the full benchmarks read."""

    root: Path

    @property
    def kg(self) -> Path:
        return self.root / "kg" / "kg_triples" / DATASET

    @property
    def candidates(self) -> Path:
        return self.root / "retrieval" / "candidates" / f"{DATASET}.parquet"

    @property
    def sequences(self) -> Path:
        return self.root / "prepare" / "sequences" / f"{DATASET}.parquet"

    @property
    def items(self) -> Path:
        return self.root / "prepare" / "items" / f"{DATASET}.parquet"

    @property
    def prompts(self) -> Path:
        return self.root / "llm" / "prompts" / DATASET / f"{VARIANT}.parquet"

    @property
    def base_model(self) -> Path:
        return self.root / "models" / "base_model" / BASE_MODEL

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def required(self, *names: str) -> dict[str, Path]:
        """name → the file that must exist (a folder: the file inside that proves it is whole)."""
        inside = {
            "kg": self.kg / "triples.parquet",
            "base_model": self.base_model / "config.json",
        }
        return {name: inside.get(name, getattr(self, name)) for name in names}


class MissingLakeData(FileNotFoundError):
    """The real data lake lacks what a full benchmark reads."""


def require_lake(*names: str, root: Path | None = None) -> LakeFiles:
    """The lake's files, or a clear error naming `make run` when any is missing.

    Checked before anything is timed, so a fresh checkout fails in a second, not after the
    first benchmark has run for minutes.
    """
    lake = LakeFiles(root or lake_root())
    missing = [str(path) for path in lake.required(*names).values() if not path.exists()]
    if missing:
        raise MissingLakeData(
            "the full benchmarks read the real ml-100k data lake, and these are missing:\n  "
            + "\n  ".join(missing)
            + "\nRun `make run` first (it builds them, ~45 min on 2 CPU cores), or "
            "`python -m benchmarks.run --quick` for tiny synthetic inputs."
        )
    return lake


def machine_info() -> dict[str, Any]:
    """The figures a reader needs to compare these numbers with theirs."""
    import torch

    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "ram_available_gib": round(psutil.virtual_memory().available / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def cpu_flags_shown() -> str:
    """The instruction-set flags that decide kernel speed here (AVX-512, BF16, AMX)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set()
    if cpuinfo.exists():
        line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return " ".join(shown) or "none of avx2/avx512/amx"


@functools.cache
def matmul_ceiling(n: int = 2048, repeats: int = 10, threads: int | None = None) -> dict[str, Any]:
    """Dense fp32 matmul FLOP/s on this machine with this thread count: the ceiling that the
    models' achieved FLOP/s are a share of (a transformer on CPU is mostly such matmuls, so
    the share says how much the rest — attention, padding, Python, memory traffic — costs).

    The best of `repeats` is the ceiling; the median shows how steady the machine was.
    """
    import torch

    threads = threads or torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=generator)
        b = torch.randn(n, n, generator=generator)
        out = torch.empty(n, n)
        for _ in range(2):  # warm-up: thread pool, caches
            torch.matmul(a, b, out=out)
        seconds = []
        for _ in range(repeats):
            tick = time.perf_counter()
            torch.matmul(a, b, out=out)
            seconds.append(time.perf_counter() - tick)
    finally:
        torch.set_num_threads(before)
    flops = 2 * n**3
    seconds.sort()
    return {
        "n": n,
        "repeats": repeats,
        "threads": threads,
        "flops_per_s": flops / seconds[0],
        "median_flops_per_s": flops / seconds[len(seconds) // 2],
    }


def ceiling(quick: bool, threads: int | None = None) -> dict[str, Any]:
    """The matmul ceiling for a run: 2048² fp32 for real, a small one in quick mode; measured
    once per process and thread count, so every share in a run divides by the same figure."""
    import torch

    threads = threads or torch.get_num_threads()
    return matmul_ceiling(256, 3, threads) if quick else matmul_ceiling(2048, 10, threads)


# ----------------------------------------------------------------------------- child processes


@dataclass
class Isolated:
    """What a child process returned, and how it ended."""

    status: str  # "ok" | "memory" (stopped at the RSS limit) | "timeout" | "error"
    result: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the child, start to exit
    sampled_peak_rss_mb: float = 0.0  # psutil's view, sampled every 50 ms (a check on VmHWM)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def peak_rss_mb(self) -> float:
        """The child's own high-water mark (VmHWM) when it finished, psutil's sample otherwise."""
        return float(self.result.get("peak_rss_mb", self.sampled_peak_rss_mb))


def tree_rss(process: psutil.Process) -> int:
    try:
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            total += child.memory_info().rss
        return total
    except psutil.Error:
        return 0


def run_isolated(
    target: str, kwargs: dict[str, Any], *, timeout_s: float, memory_limit_mb: float
) -> Isolated:
    """Call `module:function(**kwargs)` in a fresh Python; its dict result comes back as JSON.

    The child is stopped (status "memory" / "timeout") when its RSS passes `memory_limit_mb`
    or it runs past `timeout_s`, so an input that does not fit ends as a reported result
    instead of swapping or being OOM-killed along with whatever else runs on the machine.
    """
    with tempfile.TemporaryDirectory(prefix="lkg_bench_") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.harness", target, json.dumps(kwargs), str(out)]
        start = time.perf_counter()
        log = Path(tmp) / "stderr.txt"
        with log.open("w") as stderr:
            child = subprocess.Popen(command, cwd=REPO, stdout=stderr, stderr=stderr)
            watched = psutil.Process(child.pid)
            peak, status = 0, "ok"
            while child.poll() is None:
                peak = max(peak, tree_rss(watched))
                if peak > memory_limit_mb * 2**20:
                    status = "memory"
                elif time.perf_counter() - start > timeout_s:
                    status = "timeout"
                if status != "ok":
                    child.kill()
                    child.wait()
                    break
                time.sleep(0.05)
        seconds = time.perf_counter() - start
        peak_mb = peak / 2**20
        if status != "ok":
            limit = f"{memory_limit_mb:,.0f} MB RSS" if status == "memory" else f"{timeout_s:.0f} s"
            return Isolated(status, {}, seconds, peak_mb, f"stopped at the limit of {limit}")
        if child.returncode != 0 or not out.exists():
            tail = log.read_text()[-3000:]
            return Isolated("error", {}, seconds, peak_mb, f"exit {child.returncode}: {tail}")
        return Isolated("ok", json.loads(out.read_text()), seconds, peak_mb)


def peak_rss_mb() -> float:
    """This process's RSS high-water mark since it started (exec), in MiB.

    /proc/self/status `VmHWM` belongs to the address space, which exec replaces, so it is this
    program's own peak; `ru_maxrss` (the fallback off Linux) may be the parent's.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_memory_limit_mb() -> float:
    """70% of the memory available now, at most 16 GiB: the RSS at which `run_isolated` stops a
    scaling child, before it makes the machine swap."""
    return min(0.7 * psutil.virtual_memory().available / 2**20, 16 * 1024)


def reset_peak_rss() -> bool:
    """Start `peak_rss_mb` afresh from the current RSS (Linux ≥ 4.0: writing 5 to clear_refs),
    so one process can report the peak of each phase; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _child_main(target: str, kwargs_json: str, out: str) -> None:
    """The child side of `run_isolated`: run, then add the process's RSS high-water mark."""
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = dict(function(**json.loads(kwargs_json)))
    result["peak_rss_mb"] = peak_rss_mb()
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(result))


def current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


# ----------------------------------------------------------------------------- reporting


def taking_turns(
    configs: dict[str, Callable[[Any], Any]], rows: Sequence[Any]
) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """Median seconds per row of each configuration, the configurations taking turns on every
    row (a drift of the machine's speed hits all alike; the first row only warms kernels and
    the allocator), and what each returned for every row."""
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    returned: dict[str, list[Any]] = {name: [] for name in configs}
    for i, row in enumerate(rows):
        for name, step in configs.items():
            tick = time.perf_counter()
            returned[name].append(step(row))
            if i:
                seconds[name].append(time.perf_counter() - tick)
    return {name: float(np.median(s)) for name, s in seconds.items()}, returned


def table(rows: list[dict[str, Any]]) -> str:
    """Rows of already-formatted cells as a Markdown table (the pipeline's own renderer)."""
    frame = pl.DataFrame([{k: str(v) for k, v in row.items()} for row in rows])
    return markdown_table(frame)


def si(value: float, unit: str = "") -> str:
    """1.23e9 → '1.23 G' (FLOP/s and token rates span many orders of magnitude)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}".rstrip()


def with_saved_sections(results: Path, sections: dict[str, Any]) -> dict[str, Any]:
    """`sections` over every section `results` (benchmarks/results.json) already holds: each
    command owns its sections and keeps the others'."""
    saved = json.loads(results.read_text()) if results.exists() else {}
    return {**saved, **sections}


def save_results_section(results: Path, name: str, section: dict[str, Any]) -> None:
    """Replace one benchmark's section of `results`, keeping the others; written beside it and
    renamed over it, so an interrupted write loses nothing."""
    text = json.dumps(with_saved_sections(results, {name: section}), indent=2, default=str) + "\n"
    replace_atomically(results, lambda tmp: tmp.write_text(text))


if __name__ == "__main__":
    _child_main(*sys.argv[1:4])
