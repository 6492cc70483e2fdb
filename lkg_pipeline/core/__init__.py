"""The method, free of Dagster: one subpackage per stage a user sees in the UI.

data → kg → retrieval → paths → llm (prompts, train, rank) → evaluate; `io` holds what every
stage shares (all-or-nothing writes, fingerprints for reuse, tables for people).
"""
