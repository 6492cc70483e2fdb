"""Rendered prompts written a slice at a time, with what the stage reports about them."""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from lkg_pipeline.core.io.storage import ParquetParts
from lkg_pipeline.core.llm.model import letter_token_ids
from lkg_pipeline.core.llm.segments import answer_token_ids


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens of `text` without special tokens: what a prompt adds to the model's context."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class PromptTally:
    """What `write_prompts` wrote, summed over its slices."""

    examples: pl.DataFrame  # split, examples, target_in_pool
    token_lengths: pl.DataFrame  # one row "all": min, mean, p95, max tokens
    max_tokens: int
    samples: list[str]  # the first three prompts as the model reads them


def write_prompts(
    batches: Iterable[pl.DataFrame], parts: ParquetParts, tokenizer: Any, format: str
) -> PromptTally:
    """Each slice as a part, only counts kept: the texts are the largest thing the stage holds."""
    summaries, shown = [], None
    for table in batches:
        if shown is None:  # the first slice: the answer-token check and the samples
            if format == "letters":  # fails loudly if the answer is not one token
                letter_token_ids(tokenizer, table["prompt"][0])
            else:
                answer_token_ids(tokenizer, table["segments"][0][0])
            shown = table.head(3).select(
                text=pl.col("prompt") + pl.col("segments").list.join("").fill_null("")
            )
        parts.write(table)
        summaries.append(table.select("split", "target_index", "n_tokens"))
    summary = pl.concat(summaries)
    lengths = summary["n_tokens"].to_numpy()
    return PromptTally(
        examples=summary.group_by("split")
        .agg(examples=pl.len(), target_in_pool=(pl.col("target_index") >= 0).mean())
        .sort("split"),
        token_lengths=pl.DataFrame(
            {
                "split": ["all"],
                "min": [int(lengths.min())],
                "mean": [float(lengths.mean())],
                "p95": [float(np.percentile(lengths, 95))],
                "max": [int(lengths.max())],
            }
        ),
        max_tokens=int(lengths.max()),
        samples=shown["text"].to_list(),
    )
