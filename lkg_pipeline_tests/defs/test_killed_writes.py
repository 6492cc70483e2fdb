"""A run killed (SIGKILL) while a stage that writes in parts publishes its output loses nothing
already stored, and the next run of the stage succeeds with no manual step."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.end_to_end import QUICK
from lkg_pipeline_tests.dagster_cli import MATERIALIZE, REPO, instance_env

SAMPLE = {
    "ops": {
        "prepared_tables": {"config": {"max_users": 40}},
        "retriever": {"config": {"max_epochs": 1}},
        "preference_model": {"config": {"epochs": 2}},
    }
}
# the tiny model and two training steps, as `make bench-e2e --quick` runs them
TINY = {"ops": QUICK["BASE_CONFIG"]}
QUICK_TRAINING = {"ops": QUICK["LLM_CONFIG"]}
# stage, partition, a changed setting that makes it recompute, a fragment of its published path
STAGES = [
    ("kg_paths", "ml-100k", {"max_paths_per_pair": 2}, "paths/kg_paths/ml-100k"),
    ("selected_paths", "ml-100k", {"max_paths": 10}, "paths/selected_paths/ml-100k"),
    ("prompts", "ml-100k|kg_rag", {"max_history": 10}, "llm/prompts/ml-100k/kg_rag"),
    ("rankings", "ml-100k|kg_rag", {"splits": ["test"]}, "evaluate/rankings/ml-100k/kg_rag"),
]


def digests(lake: Path) -> dict[str, str]:
    """sha256 of every published file (the scratch area and temporary files aside)."""
    out = {}
    for path in sorted(lake.rglob("*")):
        relative = path.relative_to(lake)
        hidden = any(part.startswith(".") for part in relative.parts)
        aside = relative.parts[0] in ("scratch", "cache", "fingerprints")
        if path.is_file() and not hidden and not aside:
            out[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def hidden(lake: Path) -> list[Path]:
    """Temporary files and folders beside published ones (the scratch area aside)."""
    return [p for p in lake.rglob(".*") if "scratch" not in p.relative_to(lake).parts]


def run(env: dict[str, str], *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    command = list(MATERIALIZE)
    if kill_at is not None:
        command[1:3] = ["-m", "lkg_pipeline_tests.killed_cli"]
        env = env | {"LKG_KILL_AT": kill_at}
    return subprocess.run(
        [*command, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def built(lake: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    env = instance_env(tmp_path / "dagster_home", lake, (REPO / "dagster.yaml").read_text())
    steps = [
        ("group:ingest or group:prepare or group:kg or group:retrieval or group:paths",
         "ml-100k", SAMPLE),
        ("base_model", None, TINY),
        ("prompts,lora_adapter,rankings", "ml-100k|kg_rag", QUICK_TRAINING),
    ]  # fmt: skip
    for select, partition, config in steps:
        args = ["--select", select, *(["--partition", partition] if partition else [])]
        done = run(env, *args, *(["--config-json", json.dumps(config)] if config else []))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return lake, env


def test_a_kill_while_publishing_keeps_the_old_outputs_and_the_next_run_succeeds(built) -> None:
    lake, env = built
    for stage, partition, setting, published in STAGES:
        before = digests(lake)
        args = ["--select", stage, "--partition", partition]
        args += ["--config-json", json.dumps({"ops": {stage: {"config": setting}}})]
        killed = run(env, *args, kill_at=published)
        assert killed.returncode == -9, (stage, killed.stdout[-2000:], killed.stderr[-2000:])
        assert digests(lake) == before, f"{stage}: a stored file changed or vanished"
        assert hidden(lake), f"{stage}: the kill left no unpublished write behind"
        again = run(env, *args)
        assert again.returncode == 0, (stage, again.stdout[-3000:])
        assert not hidden(lake), f"{stage}: the next run left the killed write's leftovers"
        after = digests(lake)
        changed = {k for k in after if after[k] != before.get(k)}
        assert any(published in k for k in changed), (stage, sorted(changed))
