"""The knowledge graph: its relation schema (`relations`), edges from each source (`edges`,
`freebase`), the assembled graph (`graph`) and its DuckDB/Parquet copy (`warehouse`)."""
