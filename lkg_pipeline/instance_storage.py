"""SQLite instance storage whose first use is safe when several processes start at once.

Dagster's SQLite storages create their schema the first time a process opens them, with
nothing to stop two processes doing so at once: two runs started together on a brand-new
`DAGSTER_HOME` then fail (`table secondary_indexes already exists`, `UNIQUE constraint failed:
alembic_version`) and can leave `alembic_version` with two heads, which no later command
repairs. `make` migrates once before any run, but a user who sets up an instance by hand
(copies dagster.yaml, starts two runs) has no such step. This storage, which the project's
dagster.yaml selects, opens the three storages under an exclusive file lock in the instance
folder: the first process creates the schema, the others wait a moment and find it. Once the
schema exists the lock costs one `flock` per process start. POSIX only (fcntl), as Dagster's
own local storage assumes a local file system.

Its folder comes from DAGSTER_HOME (dagster.yaml cannot name the folder it sits in), as for
every Dagster command; a script that opens an instance by path uses `open_instance`, which
points DAGSTER_HOME at that path while the instance is made.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
from dagster._serdes import ConfigurableClassData

LOCK_FILE = ".schema.lock"


class LockedSqliteStorage(DagsterSqliteStorage):
    """`DagsterSqliteStorage` (same files, same layout) opened under a lock."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        os.makedirs(base_dir, exist_ok=True)
        with open(os.path.join(base_dir, LOCK_FILE), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            super().__init__(base_dir, inst_data=inst_data)

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData, config_value: dict[str, Any]
    ) -> LockedSqliteStorage:
        return cls(config_value["base_dir"], inst_data=inst_data)


def open_instance(home: str | Path) -> dg.DagsterInstance:
    """The instance whose dagster.yaml is in `home` (what `DagsterInstance.from_config` does,
    with DAGSTER_HOME pointed at `home` while the storage reads it)."""
    before = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        return dg.DagsterInstance.from_config(str(home))
    finally:
        if before is None:
            del os.environ["DAGSTER_HOME"]
        else:
            os.environ["DAGSTER_HOME"] = before
