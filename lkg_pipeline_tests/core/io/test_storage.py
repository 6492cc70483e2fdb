"""Atomic writes: a writer killed mid-write leaves nothing the next write does not clear, and a
folder it had moved aside for its swap comes back."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lkg_pipeline.core.io.storage import replace_atomically, replace_dir_atomically, sweep_stale


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_leftovers_of_a_dead_writer_go_and_a_live_writers_stay(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    target.write_text("published")
    dead, live = dead_pid(), os.getpid()
    (tmp_path / f".table.parquet.{dead}.abc.tmp").write_text("half")
    (tmp_path / f".table.parquet.{live}.def.tmp").write_text("being written")
    (tmp_path / ".table.parquet.legacy.tmp").write_text("no pid: not ours to judge")
    (tmp_path / f".other.parquet.{dead}.x.tmp").write_text("another target's")

    replace_atomically(target, lambda tmp: tmp.write_text("new"))

    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            "table.parquet",
            f".table.parquet.{live}.def.tmp",
            ".table.parquet.legacy.tmp",
            f".other.parquet.{dead}.x.tmp",
        ]
    )


def test_a_folder_moved_aside_by_a_killed_swap_comes_back(tmp_path: Path) -> None:
    target = tmp_path / "kg_paths"
    dead = dead_pid()
    aside = tmp_path / f".kg_paths.{dead}.old.xyz" / "kg_paths"  # killed between the renames
    aside.mkdir(parents=True)
    (aside / "paths.parquet").write_text("the last published")
    staging = tmp_path / f".kg_paths.{dead}.s1"
    staging.mkdir()
    (staging / "paths.parquet").write_text("complete but never published")

    assert sorted(p.name for p in sweep_stale(target)) == sorted([staging.name, aside.parent.name])
    assert (target / "paths.parquet").read_text() == "the last published"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kg_paths"]

    def fail(folder: Path) -> None:
        (folder / "paths.parquet").write_text("partial")
        raise RuntimeError("the write failed")

    with pytest.raises(RuntimeError):
        replace_dir_atomically(target, fail)
    assert (target / "paths.parquet").read_text() == "the last published"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kg_paths"]
