"""The route a user takes through the Dagster UI, driven through the webserver's GraphQL API.

The other tests call Dagster in-process or through the CLI; this one starts the real
`dagster-webserver` against `workspace.yaml`, reads the asset graph the UI shows, and launches a
partitioned materialisation the way the UI's "Materialize" button does, so a workspace that fails
to load in the webserver or a run that the UI cannot launch is caught here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import requests

from lkg_pipeline_tests.dagster_cli import instance_env

REPO = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 300.0

INSTANCE_YAML = """\
telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: DefaultRunCoordinator
"""

REPOSITORIES_QUERY = """
query Repositories {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection {
      nodes { name location { name } jobs { name } }
    }
    ... on PythonError { message stack }
  }
}
"""

ASSET_NODES_QUERY = """
query AssetNodes {
  assetNodes {
    assetKey { path }
    groupName
    isPartitioned
    jobNames
  }
}
"""

LAUNCH_RUN_MUTATION = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status tags { key value } }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""

RUN_EVENTS_QUERY = """
query RunEvents($runId: ID!) {
  runOrError(runId: $runId) {
    ... on Run {
      eventConnection {
        events {
          __typename
          ... on MessageEvent { message }
          ... on ExecutionStepFailureEvent { error { ...Failure } }
          ... on RunFailureEvent { error { ...Failure } }
        }
      }
    }
  }
}

fragment Failure on PythonError { message errorChain { error { message } } }
"""


@dataclass
class Webserver:
    url: str
    process: subprocess.Popen[str]
    log: Path

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = requests.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def webserver(lake: Path, tmp_path: Path) -> Iterator[Webserver]:
    """`dagster-webserver` on loopback with a throw-away instance and data lake."""
    env = instance_env(tmp_path / "dagster_home", lake, INSTANCE_YAML)
    port = free_port()
    log = tmp_path / "webserver.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "dagster_webserver"),
                *("-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)),
            ],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its code server and run workers share its process group
        )
    server = Webserver(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"webserver exited early:\n{server.tail()}"
            try:
                if requests.get(f"{server.url}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"webserver not up:\n{server.tail()}"
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        # The code server otherwise lingers until its heartbeat times out.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)


def run_failure(server: Webserver, run_id: str) -> str:
    """The run's error messages, for a failing assertion."""
    run = server.graphql(RUN_EVENTS_QUERY, {"runId": run_id})["runOrError"]
    events = run.get("eventConnection", {}).get("events", [])
    lines = []
    for event in events:
        error = event.get("error")
        if error:
            causes = [link["error"]["message"] for link in error["errorChain"]]
            lines.append(" <- ".join([f"{event['__typename']}: {error['message']}", *causes]))
    return "\n".join(lines) or "\n".join(str(e.get("message")) for e in events[-20:])


def test_ui_shows_graph_and_materializes_a_partition(webserver: Webserver, lake: Path) -> None:
    # The workspace loads as one repository; find its names instead of assuming them.
    repositories = webserver.graphql(REPOSITORIES_QUERY)["repositoriesOrError"]
    assert repositories["__typename"] == "RepositoryConnection", repositories
    assert len(repositories["nodes"]) == 1, repositories
    repository = repositories["nodes"][0]

    # The asset graph, as the UI's lineage view gets it.
    nodes = {
        "/".join(node["assetKey"]["path"]): node
        for node in webserver.graphql(ASSET_NODES_QUERY)["assetNodes"]
    }
    expected_groups = {
        "raw_interactions": "ingest",
        "raw_items": "ingest",
        "sequences": "prepare",
        "kg_triples": "kg",
        "selected_paths": "paths",
        "rankings": "evaluate",
        "evaluation_report": "evaluate",
        "recommendations": "evaluate",
    }
    for key, group in expected_groups.items():
        assert key in nodes, f"{key} missing from {sorted(nodes)}"
        assert nodes[key]["groupName"] == group, nodes[key]
        assert nodes[key]["isPartitioned"], nodes[key]

    # The job the UI launches a raw_tables subset through: the asset job that holds both.
    jobs = set(nodes["raw_interactions"]["jobNames"]) & set(nodes["raw_items"]["jobNames"])
    jobs &= {job["name"] for job in repository["jobs"]}
    asset_jobs = sorted(job for job in jobs if job.startswith("__ASSET_JOB"))
    assert asset_jobs, f"no asset job holds raw_interactions and raw_items: {jobs}"

    launched = webserver.graphql(
        LAUNCH_RUN_MUTATION,
        {
            "executionParams": {
                "selector": {
                    "repositoryLocationName": repository["location"]["name"],
                    "repositoryName": repository["name"],
                    "jobName": asset_jobs[0],
                    "assetSelection": [{"path": ["raw_interactions"]}, {"path": ["raw_items"]}],
                },
                "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "ml-100k"}]},
                "runConfigData": {},
            }
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        run = webserver.graphql(RUN_QUERY, {"runId": run_id})["runOrError"]
        assert run["__typename"] == "Run", run
        status = run["status"]
        if status == "SUCCESS":
            break
        assert status not in {"FAILURE", "CANCELED"}, (
            f"run {run_id} ended {status}:\n{run_failure(webserver, run_id)}"
        )
        assert time.monotonic() < deadline, f"run {run_id} still {status}:\n{webserver.tail()}"
        time.sleep(1)
    assert {"key": "dagster/partition", "value": "ml-100k"} in run["tags"], run["tags"]

    interactions = pl.read_parquet(lake / "ingest" / "raw_interactions" / "ml-100k.parquet")
    assert interactions.height == 100_000
    assert (lake / "ingest" / "raw_items" / "ml-100k.parquet").is_file()
    # Only the selected subset was written.
    assert not (lake / "ingest" / "raw_users").exists()
