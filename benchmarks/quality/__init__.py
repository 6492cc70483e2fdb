"""Ranking quality: every ranker on ml-100k's val and test (`rankers`, `make quality`) and the
planted-signal check of the KG → prompt → LoRA → ranking chain (`planted`, `make sanity`)."""
