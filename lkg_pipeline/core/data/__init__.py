"""Raw files to clean sequences: sources, readers, preparation and its invariants."""
