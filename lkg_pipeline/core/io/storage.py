"""Writes that are either complete or absent: a crash never leaves half a file behind.

Every temporary file or folder sits beside its target as `.<name>.<pid>.…`, so that the next
write of the same target can tell the leftovers of a process that was killed (SIGKILL, OOM,
power cut: no `finally` runs) from those of a live writer, and clear them (`sweep_stale`).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(target: Path) -> list[Path]:
    """Remove the temporaries of `target` left by writers that died, and put back a published
    folder that a killed `replace_dir_atomically` had moved aside for its swap; the removed
    paths. A reused pid only keeps a leftover longer."""
    prefix = f".{target.name}."
    removed = []
    for sibling in sorted(target.parent.glob(glob.escape(prefix) + "*")):
        pid = sibling.name[len(prefix) :].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        moved_aside = sibling / target.name
        if ".old." in sibling.name and moved_aside.exists() and not target.exists():
            os.replace(moved_aside, target)
        if sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def _prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def replace_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary path beside `target`, then rename it over `target`.

    The rename is atomic on one filesystem, so readers (another run, the UI) see either the old
    file or the new one, and a failure in `write` leaves the old one untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=_prefix(target), suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp creates 0600; published files are readable like any other
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(
    frame: pl.DataFrame, target: Path, metadata: dict[str, str] | None = None
) -> None:
    """`metadata`: Parquet key-value metadata, e.g. the settings the table was made with,
    which then travel with the file (read back with `pl.read_parquet_metadata`)."""
    replace_atomically(
        target, lambda tmp: frame.write_parquet(tmp, compression="zstd", metadata=metadata)
    )


def replace_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh folder beside `target` with `write`, then swap it in for `target`.

    A folder cannot be renamed over a non-empty one, so the old folder is first moved aside and
    deleted only after the new one is in place: at every instant `target` is either the old
    complete folder or the new complete one (or, for a moment, absent; never half-written; a
    writer killed in that moment leaves the old one aside, and the next write puts it back).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=_prefix(target)))
    try:
        write(staging)
        staging.chmod(0o755)
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_prefix(target) + "old."))
            os.replace(target, old / target.name)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def concatenate_parquet(
    parts: list[Path], target: Path, metadata: dict[str, str] | None = None
) -> None:
    """`parts` as one Parquet file, in order, a row group at a time; `metadata`: key-value
    metadata for its footer. A single part without metadata is renamed.

    By hand because the engines buffer: DuckDB's `COPY (select * from read_parquet([...]))`
    keeps insertion order by buffering (it takes `write_paths`' peak at 100K users from 2.8 to
    6.7 GB), and polars' `sink_parquet` of a scan of parts holds about twice the whole table.
    Copying row groups through Arrow holds one row group at a time (the peaks that keeps:
    benchmarks/README.md#hot-paths-against-the-reference and #after-the-paths-to-1m-users).
    """
    if len(parts) == 1 and not metadata:
        parts[0].replace(target)
        return
    schema = pq.read_schema(parts[0])
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
    with pq.ParquetWriter(target, schema, compression="zstd") as writer:
        for part in parts:
            file = pq.ParquetFile(part)
            for group in range(file.num_row_groups):
                writer.write_table(file.read_row_group(group).replace_schema_metadata(None))


class ParquetParts:
    """A table too large for memory, written a batch at a time as numbered Parquet parts.

    The IO manager concatenates them, a row group at a time, into the asset's file
    (`concatenate`), so neither side holds more than a part; each part stays a row group of its
    own, so a reader can still skip other batches by the statistics of their rows. Parts from
    an earlier, failed run in the same folder are removed first.
    """

    def __init__(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder, self.files = folder, []

    def write(self, frame: pl.DataFrame) -> None:
        file = self.folder / f"part-{len(self.files):06d}.parquet"
        frame.write_parquet(file, compression="zstd")
        self.files.append(file)

    def concatenate(self, target: Path, metadata: dict[str, str] | None = None) -> None:
        """The parts, in order, as the file `target` (with footer `metadata`)."""
        assert self.files, f"no part written in {self.folder}"
        concatenate_parquet(self.files, target, metadata or {})

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
