"""Benchmarks for the pipeline's hot paths, each measured against the reference's approach in
the same run (see benchmarks/README.md); `python -m benchmarks.run` runs them all."""
