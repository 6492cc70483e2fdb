"""Shared fixtures: the real ML-100K wheel (fetched once) and a throw-away data lake."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lkg_pipeline.core.data.sources import RECBOLE_WHEEL, fetch_recbole_wheel
from lkg_pipeline.core.llm.probes import PROBE_CACHE_ENV

REPO = Path(__file__).resolve().parents[1]
# Kept kernel measurements (core.llm.probes) go to a file of this test session, not the user's;
# the processes the tests launch inherit it.
os.environ[PROBE_CACHE_ENV] = str(Path(tempfile.mkdtemp(prefix="lkg-probes-")) / "probes.json")


@pytest.fixture(scope="session")
def recbole_wheel() -> Path:
    """RecBole's wheel in the repo's cache (the same file `make run` uses), fetched if absent."""
    return fetch_recbole_wheel(Path(os.environ.get("LKG_TEST_CACHE", REPO / "data_lake" / "cache")))


@pytest.fixture
def lake(tmp_path: Path, recbole_wheel: Path) -> Path:
    """An empty data lake whose cache already holds the wheel (no second download)."""
    root = tmp_path / "lake"
    (root / "cache").mkdir(parents=True)
    shutil.copy(recbole_wheel, root / "cache" / RECBOLE_WHEEL)
    return root


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """For the model tests: the tiny model gains little from a second thread, and two threads
    per process stall each other badly when the 2-core machine is busy; subprocesses keep the
    launcher's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The repo's model cache (SmolLM2's tokenizer; fetched once on a fresh machine)."""
    return Path(os.environ.get("LKG_TEST_CACHE", REPO / "data_lake" / "cache"))


@pytest.fixture(scope="session")
def tiny_base(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, as a checkpoint folder."""
    from lkg_pipeline.core.llm.model import load_base

    model, tokenizer, _ = load_base("tiny-random", cache_dir)
    folder = tmp_path_factory.mktemp("tiny_base")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
