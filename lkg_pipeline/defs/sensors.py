"""Sensors: new raw files start ingestion; retraining's llm/evaluate stages follow it.

Both are off by default: nothing trains or rewrites data until a person turns them on in the
UI (Automation tab), where their ticks, cursors and the runs they started are visible.
"""

import hashlib
import json
import time
from pathlib import Path

import dagster as dg

from lkg_pipeline.defs.jobs import dataset_pipeline
from lkg_pipeline.defs.layout import sources_dir
from lkg_pipeline.defs.partitions import dataset_partitions
from lkg_pipeline.defs.resources import DataLake

# Files modified more recently than this may still be being copied: wait for the next tick.
SETTLE_SECONDS = 30.0


def drop_folder_fingerprint(folder: Path, now: float, settle: float = SETTLE_SECONDS) -> str | None:
    """A digest of the folder's files (name, size, mtime), or None when it has no files or one
    of them changed in the last `settle` seconds (a copy in progress)."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        return None
    stats = [(str(p.relative_to(folder)), p.stat()) for p in files]
    if any(now - s.st_mtime < settle for _, s in stats):
        return None
    listing = [(name, s.st_size, s.st_mtime_ns) for name, s in stats]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


@dg.sensor(
    job=dataset_pipeline,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Runs dataset_pipeline for a dataset when files land in "
    "data_lake/sources/<dataset>/ (new or changed, once a copy has settled).",
)
def raw_files_sensor(context: dg.SensorEvaluationContext, lake: DataLake):
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    now = time.time()
    requests = []
    for dataset in dataset_partitions.get_partition_keys():
        fingerprint = drop_folder_fingerprint(sources_dir(lake.path, dataset), now)
        if fingerprint is None or seen.get(dataset) == fingerprint:
            continue
        seen[dataset] = fingerprint
        requests.append(dg.RunRequest(partition_key=dataset, run_key=f"{dataset}:{fingerprint}"))
    context.update_cursor(json.dumps(seen, sort_keys=True))
    if not requests:
        return dg.SkipReason("no new or changed files in data_lake/sources/<dataset>/")
    return requests


# The llm and evaluate stages carry `AutomationCondition.eager()`: once their upstream changes
# (a retrained preference model, a new adapter) they are requested, in dependency order, across
# the dataset and dataset × variant partitions.
retrain_followups = dg.AutomationConditionSensorDefinition(
    "retrain_followups",
    target=dg.AssetSelection.groups("llm", "evaluate") - dg.AssetSelection.assets("base_model"),
    default_status=dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=60,
    description="After retraining: prompts → LoRA adapters → rankings → evaluation report "
    "and recommendations, for every variant.",
)
