"""The enumerated paths' tables as a DuckDB database, for people and tools to query."""

from pathlib import Path

from lkg_pipeline.core.kg.warehouse import write_tables
from lkg_pipeline.core.paths.enumeration import quoted_path

PATH_TABLES = ("paths", "pair_features", "history_profile")
# Every table in one total order (its rows are distinct), so a re-run writes the same file.
PATHS_DDL = """
create table paths as select * from read_parquet({paths})
    order by example_id, history_position desc, candidate_position, hops, path_type, via,
        via_item, relations;
create table pair_features as select * from read_parquet({pair_features}) order by all;
create table history_profile as select * from read_parquet({history_profile}) order by all;
"""


def write_paths_warehouse(folder: Path, database: Path) -> None:
    """The Parquet tables of `folder` copied into `database`, sorted for the queries people run."""
    files = {name: quoted_path(folder / f"{name}.parquet") for name in PATH_TABLES}
    write_tables({}, PATHS_DDL.format(**files), database)
