"""Jobs: what a person, a schedule or a sensor launches as one unit (one dataset partition).

A Dagster job spans one partitions definition, so the stages partitioned by dataset × variant
(prompts → adapter → rankings) and the report cannot join `retrain_dataset` itself; they follow
it through the `retrain_followups` automation sensor (sensors.py), which Dagster runs in
dependency order across the two partitionings.
"""

import dagster as dg

# Every dataset-partitioned stage, from raw files to the selected prompt paths.
dataset_pipeline = dg.define_asset_job(
    "dataset_pipeline",
    selection=dg.AssetSelection.groups("ingest", "prepare", "kg", "retrieval", "paths"),
    description="Ingest → prepare → knowledge graph → retriever → paths, for one dataset.",
)

# What weekly retraining recomputes from data already ingested.
retrain_dataset = dg.define_asset_job(
    "retrain_dataset",
    selection=dg.AssetSelection.groups("retrieval", "paths"),
    description=(
        "Retriever → candidates → paths → preference model for one dataset; with the "
        "`retrain_followups` sensor on, prompts → adapters → rankings → report follow."
    ),
)
