"""Writes that are either complete or absent: a crash never leaves half a file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import polars as pl


def replace_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary path beside `target`, then rename it over `target`.

    The rename is atomic on one filesystem, so readers (another run, the UI) see either the old
    file or the new one, and a failure in `write` leaves the old one untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp creates 0600; published files are readable like any other
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(frame: pl.DataFrame, target: Path) -> None:
    replace_atomically(target, lambda tmp: frame.write_parquet(tmp, compression="zstd"))
