"""Recommendations for the next item after everything a user has consumed, with explanations.

The same two stages as the evaluation, applied to each user's full history (train + val +
test) instead of a held-out prefix: the retriever proposes 20 unseen items, the KG paths from
the history to them are selected as for the prompts, and the served ranker orders them: the
fine-tuned LLM from one prompt, or the retriever itself (no LLM runs) when validation says no
LLM beats it (`core.evaluate.serving`). The paths that were in the prompt become the explanation of
each recommended item ("because you watched Heat (1995): same director"), so an explanation
never cites a reason the ranker did not see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from lkg_pipeline.core.llm.prompts import (
    PromptSettings,
    build_prompts,
    path_phrase,
    shown_paths,
    truncate_titles,
)
from lkg_pipeline.core.paths.enumeration import enumerate_paths
from lkg_pipeline.core.paths.selection import select_paths
from lkg_pipeline.core.retrieval.candidates import CANDIDATE_SCHEMA
from lkg_pipeline.core.retrieval.ranking import rank_users
from lkg_pipeline.core.retrieval.seqrec import SequentialRecommender

NEXT_SPLIT = "next"  # the split name of full-history examples (no true item is known)
RECOMMENDATION_COLUMNS = {
    "user_idx": pl.Int32,
    "rank": pl.Int32,  # 1 = the ranker's first choice
    "item_idx": pl.Int32,
    "title": pl.String,
    "score": pl.Float32,  # the ranker's score (+ the retriever's log-prior if trained over it)
    "retriever_rank": pl.Int32,  # where the retriever had put it among the 20
    "explanation": pl.String,  # the first reason, or null when no path reached the item
    "explanations": pl.List(pl.String),  # every reason that was in the prompt
    "variant": pl.String,  # whose prompts and KG paths explain the items
    # what ordered them (core.evaluate.serving: the retriever unless beaten on val)
    "ranker": pl.String,
}


@dataclass(frozen=True)
class RecommendConfig:
    top_n: int = 10  # items recommended per user
    n_candidates: int = 20  # the retriever's proposals the LLM ranks (letters A..T)
    max_users: int | None = None  # the first N users (None: every user)

    def __post_init__(self) -> None:
        if not (1 <= self.top_n <= self.n_candidates <= 20):
            raise ValueError(
                f"need 1 <= top_n ({self.top_n}) <= n_candidates ({self.n_candidates}) <= 20"
            )
        if self.max_users is not None and self.max_users < 1:
            raise ValueError(f"max_users={self.max_users} must be ≥ 1, or None (all users)")


def full_histories(sequences: pl.DataFrame, max_users: int | None = None) -> list[list[int]]:
    """Every item of each user in order (train, val and test), list index = user_idx."""
    per_user = (
        sequences.sort("user_idx", "position")
        .group_by("user_idx", maintain_order=True)
        .agg(items=pl.col("item_idx"))
    )
    users = per_user["user_idx"].to_numpy()
    assert (users == np.arange(len(users))).all(), "user_idx must be dense 0..U-1"
    histories = [list(map(int, items)) for items in per_user["items"].to_list()]
    return histories if max_users is None else histories[:max_users]


def next_item_examples(
    model: SequentialRecommender,
    sequences: pl.DataFrame,
    config: RecommendConfig = RecommendConfig(),
) -> pl.DataFrame:
    """One example per user in the candidates table's shape: the full history as input and the
    retriever's top `n_candidates` unseen items, with no true item."""
    histories = full_histories(sequences, config.max_users)
    ranked = rank_users(model, histories, config.n_candidates)  # every consumed item excluded
    values, items = ranked.values, ranked.items  # (U, k) each
    frame = pl.DataFrame(
        {
            "user_idx": np.arange(len(histories)),
            "split": [NEXT_SPLIT] * len(histories),
            "prefix_len": [len(h) for h in histories],
            "target_item_idx": [None] * len(histories),
            "candidate_item_idxs": items.numpy().tolist(),
            "candidate_scores": values.numpy().tolist(),
            "target_rank": [None] * len(histories),
            "in_candidates": [None] * len(histories),
        }
    )
    columns = [pl.col(name).cast(dtype) for name, dtype in CANDIDATE_SCHEMA.items()]
    return (
        frame.select(columns)
        .with_row_index("example_id")
        .with_columns(pl.col("example_id").cast(pl.Int64))
    )


def prompts_as_trained(
    examples: pl.DataFrame,
    sequences: pl.DataFrame,
    titles: dict[int, str],
    kg: Any | None,
    preferences: pl.DataFrame | None,
    variant: str,
    settings: PromptSettings,
    tokenizer: Any,
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Prompts for new examples, made exactly as the prompts recorded in `settings` were:
    titles cut, paths enumerated and selected, prompts rendered with the same settings, so an
    adapter ranks the kind of prompt it was trained on. `kg` (the KG tables: entities,
    triples, relations) is None for `llamarec`, `preferences` None except for `lkg_rag`.
    Returns the prompts and the selected paths (None without a KG).
    """
    shown = truncate_titles(titles, tokenizer, settings.prompt.max_title_tokens)
    selected = None
    if kg is not None:
        assert settings.paths is not None and settings.selection is not None, (
            f"{variant}: the recorded settings have no path settings"
        )
        paths = enumerate_paths(
            examples,
            sequences,
            kg.entities,
            kg.triples,
            kg.relations,
            len(titles),
            settings.paths,
        ).paths
        selected = select_paths(paths, preferences, settings.selection).with_columns(
            variant=pl.lit(variant)
        )

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    table = build_prompts(examples, sequences, shown, selected, variant, settings.prompt, count)
    return table, selected


def explanation_texts(
    selected_paths: pl.DataFrame, titles: dict[int, str], item_verb: str
) -> pl.DataFrame:
    """(example_id, candidate_item_idx, explanations): the prompt's paths as sentences, most
    salient first ("because you watched Heat (1995): same director")."""
    past = {"watch": "watched", "buy": "bought"}.get(item_verb, f"{item_verb}ed")
    rows = []
    for ex, hist, cand, relations, via, via_item, order in shown_paths(selected_paths).iter_rows():
        phrase = path_phrase(relations, via, titles[hist], titles[cand], via_item)
        rows.append((ex, cand, order, f"because you {past} {titles[hist]}: {phrase}"))
    frame = pl.DataFrame(
        rows,
        schema={
            "example_id": pl.Int64,
            "candidate_item_idx": pl.Int32,
            "selection_rank": pl.Int64,
            "text": pl.String,
        },
        orient="row",
    )
    return (
        frame.sort("example_id", "selection_rank")
        .group_by("example_id", "candidate_item_idx", maintain_order=True)
        .agg(explanations=pl.col("text"))
    )


def recommendation_table(
    examples: pl.DataFrame,
    ranked: pl.DataFrame,
    explanations: pl.DataFrame | None,
    titles: dict[int, str],
    consumed: list[list[int]],
    variant: str,
    top_n: int,
    ranker: str,
) -> pl.DataFrame:
    """The top `top_n` of each user's ranked candidates with titles and explanations.

    Fails if an item a user already consumed was recommended: the retriever masks the whole
    history, so this would mean the stages disagree about who consumed what.
    """
    retriever_rank = examples.select(
        "example_id",
        item_idx=pl.col("candidate_item_idxs"),
        retriever_rank=pl.int_ranges(1, pl.col("candidate_item_idxs").list.len() + 1),
    ).explode("item_idx", "retriever_rank")
    top = (
        ranked.select(
            "example_id",
            "user_idx",
            item_idx=pl.col("ranked_item_idxs").list.head(top_n),
            score=pl.col("ranked_scores").list.head(top_n),
        )
        .with_columns(rank=pl.int_ranges(1, pl.col("item_idx").list.len() + 1))
        .explode("item_idx", "score", "rank")
        .join(retriever_rank, on=["example_id", "item_idx"], how="left")
    )
    if explanations is not None:
        top = top.join(
            explanations.rename({"candidate_item_idx": "item_idx"}),
            on=["example_id", "item_idx"],
            how="left",
        )
    else:
        top = top.with_columns(explanations=pl.lit(None, pl.List(pl.String)))
    table = top.with_columns(
        title=pl.col("item_idx").replace_strict(titles, return_dtype=pl.String),
        explanation=pl.col("explanations").list.first(),
        variant=pl.lit(variant),
        ranker=pl.lit(ranker),
    ).select([pl.col(c).cast(t) for c, t in RECOMMENDATION_COLUMNS.items()])
    seen = pl.DataFrame(
        {"user_idx": np.arange(len(consumed)), "item_idx": consumed},
        schema={"user_idx": pl.Int32, "item_idx": pl.List(pl.Int32)},
    ).explode("item_idx")
    repeated = table.join(seen, on=["user_idx", "item_idx"], how="semi")
    if repeated.height:
        raise ValueError(
            f"{repeated.height} recommendations are items the user already consumed, e.g. "
            f"{repeated.select('user_idx', 'item_idx').head(3).to_dicts()}"
        )
    return table.sort("user_idx", "rank")
