"""LlamaRec-LKG-RAG as a Dagster asset pipeline: `core` holds the logic, `defs` the wiring."""
