"""LoRA fine-tuning of the ranker.

Runs as `python -m lkg_pipeline.core.llm.train`, under `accelerate launch`, or in-process.
"""
