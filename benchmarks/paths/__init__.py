"""Path enumeration against networkx and its scaling to 1M users (`bench`, part of `make bench`),
then the stages after the paths to 1M users (`after_paths`, `make bench-after-paths`)."""
