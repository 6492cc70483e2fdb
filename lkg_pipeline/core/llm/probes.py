"""Kept start-up measurements: an `auto` kernel choice is measured once per machine, not per run.

`dtype: auto` (precision.py) and `attention: auto` (segments.py) time both candidates on the
model's own shapes at start-up. Timed beside another busy process the ratio can invert, and a
run's numbers with it: on an AMD EPYC (2 cores) with a test job beside it, the attention probe
read kernel 258 vs matmul 324 ms (×0.80: kernel) where alone it reads 11.8 vs 4.7 ms (×2.52:
matmul), and the LoRA's step-0 validation NDCG@10 moved from 0.2611 to 0.2309. So:

- each measurement records the CPU share its process got while it ran (CPU time over wall time
  × threads: about 1 alone, about a half beside another process as busy);
- one taken with at least `MIN_CPU_SHARE` is kept, per machine key (CPU model and flags, torch
  version, threads, the probe's shapes), and every later `auto` with that key reuses it and says
  so in its reason;
- one taken with less is used for this run only, and its reason says the machine was busy.

The file is `$LKG_PROBE_CACHE`, else `probes.json` under `$XDG_CACHE_HOME/lkg_pipeline`
(`~/.cache/lkg_pipeline`); `LKG_PROBE_CACHE=off` measures every time and keeps nothing. Delete
the file to measure again (after a kernel or BIOS update, say). A file that cannot be read is
reported and replaced: a cache must never stop a run.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PROBE_CACHE_ENV = "LKG_PROBE_CACHE"
# On 2 AMD EPYC cores the dtype and attention probes measured a share of 0.84–0.99 alone and
# 0.49–0.50 beside a second 2-thread torch process (where the forward attention probe flipped
# from matmul 1.6 vs kernel 2.7 ms to kernel 7.9 vs matmul 39.9 ms). Between the two a
# measurement is not trusted to stand for the machine.
MIN_CPU_SHARE = 0.75
# The CPU features that decide how fast bf16 runs: AMX tiles, AVX-512 BF16 dot products, and
# AVX-512 / AVX2 without which oneDNN falls back to slow conversions.
BF16_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2", "fma")
FORMAT = 1  # of the file; another is ignored (and replaced)


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's answer elsewhere)."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of `BF16_FLAGS` this CPU has (empty where /proc/cpuinfo does not exist)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return []
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [f for f in BF16_FLAGS if f in present]
    return []


def probe_cache() -> Path | None:
    """The file kept measurements live in; None when `LKG_PROBE_CACHE=off`."""
    named = os.environ.get(PROBE_CACHE_ENV, "").strip()
    if named.lower() == "off":
        return None
    if named:
        return Path(named).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lkg_pipeline" / "probes.json"


@dataclass(frozen=True)
class Probed:
    """A measurement's result (the fields the caller's choice is rebuilt from) and its record."""

    result: dict[str, Any]
    cpu_share: float
    measured_utc: str
    kept: bool  # in the file: this run measured it alone, or reused it
    reused: bool  # read from the file rather than measured by this process

    def note(self, threads: int, override: str) -> str:
        """What the choice's reason adds: where the figures come from and whether they stand."""
        share = f"CPU share {self.cpu_share:.2f} of {threads} threads"
        if self.reused:
            return f"kept measurement of {self.measured_utc}, {share}"
        if self.kept:
            return f"measured now, {share}: kept for later runs on this machine"
        return (
            f"measured now with {share}, below {MIN_CPU_SHARE}: another process was busy, so "
            f"these timings may not stand for this machine and are not kept; set `{override}` "
            "for a run that reproduces"
        )


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
        if stored.get("format") != FORMAT or not isinstance(stored.get("records"), dict):
            raise ValueError(f"format {stored.get('format')!r}, expected {FORMAT}")
        return stored["records"]
    except (OSError, ValueError, AttributeError) as error:
        warnings.warn(
            f"{path}: kept kernel measurements unreadable ({error}); measuring again and "
            "replacing the file",
            stacklevel=3,
        )
        return {}


def _write(path: Path, records: dict[str, Any]) -> None:
    """Atomically (a temporary file, then rename): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False
    ) as out:
        json.dump({"format": FORMAT, "records": records}, out, indent=1, sort_keys=True)
    os.replace(out.name, path)


def machine_key(kind: str, threads: int, **shape: Any) -> dict[str, Any]:
    """What a measurement depends on: the machine, torch, the threads the probe runs on and
    its shapes."""
    return {
        "kind": kind,
        "cpu_model": cpu_model(),
        "cpu_flags": " ".join(cpu_flags()),
        "torch": torch.__version__,
        "threads": threads,
        **{k: str(v) for k, v in shape.items()},
    }


def kept_or_measured(key: Mapping[str, Any], measure: Callable[[], dict[str, Any]]) -> Probed:
    """`measure()`'s result for `key` (a `machine_key`), from the kept file when it holds one,
    else measured now on key["threads"] threads (and kept when this process had the CPU to
    itself)."""
    path = probe_cache()
    name = json.dumps(dict(key), sort_keys=True)
    records = _read(path) if path is not None else {}
    if name in records:
        r = records[name]
        return Probed(r["result"], r["cpu_share"], r["measured_utc"], True, True)
    wall, cpu = time.perf_counter(), time.process_time()
    result = measure()
    threads = int(key["threads"])
    share = (time.process_time() - cpu) / max((time.perf_counter() - wall) * threads, 1e-9)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    keep = path is not None and share >= MIN_CPU_SHARE
    if keep:
        records = _read(path)  # another process may have kept something meanwhile
        records[name] = {"key": dict(key), "result": result, "cpu_share": round(share, 3),
                         "measured_utc": stamp}  # fmt: skip
        _write(path, records)
    return Probed(result, round(share, 3), stamp, keep, False)
