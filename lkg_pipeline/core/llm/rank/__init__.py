"""Ranking prompts with the LLM, and the score rules on its letter logits.

Runs as `python -m lkg_pipeline.core.llm.rank`, under `accelerate launch`, or in-process.
"""
