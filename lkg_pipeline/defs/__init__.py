"""The Dagster layer: assets, checks and resources that wrap `lkg_pipeline.core`."""
