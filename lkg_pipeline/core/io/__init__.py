"""What every stage shares: all-or-nothing writes, content fingerprints for reuse, tables."""
