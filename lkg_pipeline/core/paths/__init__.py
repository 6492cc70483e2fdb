"""Relation paths from history to candidates, the preference over path types, selection."""
