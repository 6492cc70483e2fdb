"""Prompts in the pipeline's contract for the tiny-model tests of the LLM stages."""

import polars as pl

from lkg_pipeline.core.llm.model import LETTERS
from lkg_pipeline.core.llm.prompts import PROMPT_COLUMNS


def prompt_table(n: int = 9) -> pl.DataFrame:
    rows = []
    for i in range(n):
        history = "\n".join(f"({j + 1}) film {i * 7 + j}" for j in range(1 + i % 4))
        pool = "\n".join(f"({letter}) item {i}-{c}" for c, letter in enumerate(LETTERS))
        rows.append(
            {
                "example_id": i,
                "user_idx": i,
                "split": "test",
                "variant": "lkg_rag",
                "prompt": f"User history:\n{history}\n\nCandidate pool:\n{pool}\nAnswer:",
                "candidate_item_idxs": [100 * i + c for c in range(len(LETTERS))],
                "target_index": -1 if i == 0 else i % len(LETTERS),
                "n_tokens": 0,
            }
        )
    return pl.DataFrame(rows, schema=PROMPT_COLUMNS)
