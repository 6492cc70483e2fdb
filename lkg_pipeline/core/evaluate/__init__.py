"""Rankers compared and chosen: metrics, paired tests, `ltr`, the served ranker, recommendations."""
