"""The knowledge graph as a DuckDB database and Parquet files, written all-or-nothing.

DuckDB allows one writer per file, so each dataset has its own database, and it is built in a
temporary file that replaces the old one only when complete: a failed or killed run leaves the
previous graph readable and no lock behind. Parquet copies are what other stages read (reading
Parquet takes no lock, so any number of runs can read while one writes).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from lkg_pipeline.core.io.storage import replace_atomically, replace_dir_atomically
from lkg_pipeline.core.kg.graph import KnowledgeGraph

TABLES = ("entities", "relations", "triples")

# Sorted by head so that DuckDB's zone maps prune scans for "edges out of these nodes", the
# join every path query starts with; the indexes serve point look-ups from tools and the UI.
DDL = """
create table entities as select * from entities_df order by entity_id;
create table relations as select * from relations_df order by relation;
create table triples as select * from triples_df order by head, relation, tail;
create unique index entities_id on entities(entity_id);
create index triples_head on triples(head);
create index triples_tail on triples(tail);
"""


def write_duckdb(kg: KnowledgeGraph, target: Path) -> None:
    write_tables(_kg_frames(kg), DDL, target)


def _build_duckdb(frames: dict[str, pl.DataFrame], ddl: str, path: Path) -> None:
    path.unlink(missing_ok=True)  # DuckDB refuses to open an empty placeholder file
    con = duckdb.connect(str(path))
    try:
        for name, frame in frames.items():
            con.register(name, frame)
        con.execute(ddl)
        con.execute("checkpoint")
    finally:
        con.close()
    Path(f"{path}.wal").unlink(missing_ok=True)


def write_tables(frames: dict[str, pl.DataFrame], ddl: str, target: Path) -> None:
    """A DuckDB file made by running `ddl` over `frames` (registered by name), all-or-nothing."""
    replace_atomically(target, lambda tmp: _build_duckdb(frames, ddl, tmp))


def _kg_frames(kg: KnowledgeGraph) -> dict[str, pl.DataFrame]:
    return {"entities_df": kg.entities, "relations_df": kg.relations, "triples_df": kg.triples}


def write_parquet(kg: KnowledgeGraph, folder: Path) -> dict[str, Path]:
    """The three tables as one folder, swapped in whole (never two tables of different
    graphs side by side)."""

    def write(staging: Path) -> None:
        for name in TABLES:
            getattr(kg, name).write_parquet(staging / f"{name}.parquet", compression="zstd")

    replace_dir_atomically(folder, write)
    return {name: folder / f"{name}.parquet" for name in TABLES}


def write_kg(kg: KnowledgeGraph, database: Path, folder: Path) -> dict[str, Path]:
    """The DuckDB file and the Parquet folder of one graph, both written in full before either
    replaces the old one; then the folder and the file are swapped in back to back. A failure
    while writing leaves both old copies as they were; only a kill between the two renames
    (microseconds, not the seconds of a write) could leave them of different builds, and the
    failed run then records nothing, so the next materialisation rewrites both."""
    paths: dict[str, Path] = {}

    def write(tmp: Path) -> None:
        _build_duckdb(_kg_frames(kg), DDL, tmp)
        paths.update(write_parquet(kg, folder))  # committed; the DuckDB rename follows

    replace_atomically(database, write)
    return paths


def read_parquet(folder: Path) -> KnowledgeGraph:
    tables = {name: pl.read_parquet(folder / f"{name}.parquet") for name in TABLES}
    return KnowledgeGraph(tables["entities"], tables["triples"], tables["relations"], {})
