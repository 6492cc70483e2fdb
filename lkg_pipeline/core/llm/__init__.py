"""The LLM ranker: base models, prompts, precision and attention paths, `train` and `rank`."""
