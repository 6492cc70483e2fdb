"""The knowledge graph: typed nodes and relations (`graph`) and its DuckDB/Parquet copy."""
