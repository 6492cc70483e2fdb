"""How the tests drive the real `dagster` CLI and webserver: one instance and lake per test."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MATERIALIZE = [
    sys.executable,
    "-m",
    "dagster",
    "asset",
    "materialize",
    "-m",
    "lkg_pipeline.definitions",
]


def instance_env(home: Path, lake: Path, instance_yaml: str | None = None) -> dict[str, str]:
    """The environment for a throw-away Dagster instance in `home` writing to `lake`.

    A new instance's SQLite schema is created on first use; two processes racing to create it
    fail, so it is set up once here, as a first `make run` would.
    """
    home.mkdir(parents=True, exist_ok=True)
    if instance_yaml is not None:
        (home / "dagster.yaml").write_text(instance_yaml)
    env = os.environ | {"DAGSTER_HOME": str(home), "LKG_DATA_LAKE": str(lake)}
    subprocess.run(
        [sys.executable, "-m", "dagster", "instance", "migrate"],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return env
