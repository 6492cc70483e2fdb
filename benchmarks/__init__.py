"""Benchmarks of the pipeline, one folder per topic (`retrieval/`, `paths/`, `llm/`, `quality/`)
sharing one harness (`harness.py`); `python -m benchmarks.run` (`make bench`) runs the hot paths
against the reference's approach, `end_to_end.py` times `make run`. Index: benchmarks/README.md."""
