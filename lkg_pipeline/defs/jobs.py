"""Jobs: what a person (or `make run`) launches as one unit."""

import dagster as dg

# Every dataset-partitioned stage, from raw files to the selected prompt paths.
dataset_pipeline = dg.define_asset_job(
    "dataset_pipeline",
    selection=dg.AssetSelection.groups("ingest", "prepare", "kg", "retrieval", "paths"),
    description="Ingest → prepare → knowledge graph → retriever → paths, for one dataset.",
)
