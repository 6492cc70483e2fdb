"""The Makefile's instance setup: a brand-new DAGSTER_HOME is usable by concurrent runs at once.

Two runs that each find no SQLite schema both create it and leave `alembic_version` with two
heads, after which every command fails (issue 16). The target that creates the home migrates it
once; this drives that target on a home nothing else has touched, then starts two partitions
concurrently, as a person running two terminals would.
"""

import gzip
import os
import sqlite3
import subprocess
from pathlib import Path

import polars as pl

from lkg_pipeline_tests.dagster_cli import MATERIALIZE, REPO


def test_make_prepares_a_fresh_home_for_concurrent_runs(tmp_path: Path) -> None:
    home, lake = tmp_path / "brand-new-home", tmp_path / "lake"
    made = subprocess.run(
        ["make", "--no-print-directory", f"DAGSTER_HOME={home}", f"{home}/dagster.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    for db in ("history/runs.db", "history/runs/index.db", "schedules/schedules.db"):
        with sqlite3.connect(home / db) as con:  # one schema head each, before any run
            assert len(con.execute("select * from alembic_version").fetchall()) == 1, db

    latest, beauty = tmp_path / "latest", tmp_path / "beauty"
    latest.mkdir()
    (latest / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,10\n")
    (latest / "movies.csv").write_text("movieId,title,genres\n1,Heat (1995),Crime\n")
    beauty.mkdir()
    (beauty / "ratings_Beauty.csv").write_text("A1,B1,5.0,100\n")
    (beauty / "meta_Beauty.json.gz").write_bytes(
        gzip.compress(b"{'asin': 'B1', 'title': 'Lip Balm'}\n")
    )
    env = os.environ | {"DAGSTER_HOME": str(home), "LKG_DATA_LAKE": str(lake)}
    procs = [
        subprocess.Popen(
            [
                *MATERIALIZE,
                "--select",
                "raw_interactions,raw_items",
                "--partition",
                dataset,
                "--config-json",
                f'{{"ops": {{"raw_tables": {{"config": {{"source": "{source}"}}}}}}}}',
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for dataset, source in (("ml-latest-small", latest), ("beauty", beauty))
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    for dataset, item in (("ml-latest-small", 1), ("beauty", "B1")):
        items = pl.read_parquet(lake / "ingest" / "raw_items" / f"{dataset}.parquet")
        assert items["item_id"].to_list() == [item]
