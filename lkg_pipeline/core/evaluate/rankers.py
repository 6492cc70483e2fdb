"""Every ranker's per-example ranks for the report, and the ranks that choose what to serve.

The report scores the retriever, each ranked LLM variant, its `+prior` fusion with the
retriever, the preference module and the learned rerankers side by side. Two of them set
something on validation (the fusion's λ, the rerankers' boosting rounds), so their validation
ranks would flatter them when the served ranker is chosen there: the choice reads
cross-fitted validation ranks for those instead (`choice_ranks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from lkg_pipeline.core.evaluate.compare import PRIOR_SUFFIX, example_based_ranks, llm_ranks
from lkg_pipeline.core.evaluate.ltr import LtrConfig, LtrResult, fit_and_rank, score
from lkg_pipeline.core.evaluate.ltr_features import feature_names, feature_table, llm_scores
from lkg_pipeline.core.evaluate.serving import LTR, LTR_LLM, ranked_by
from lkg_pipeline.core.llm.prompts import VARIANTS
from lkg_pipeline.core.llm.rank.fusion import cross_fitted_val_ranks, fused_ranks

# Boosting starts from the retriever's score and learns a correction (LtrConfig): where the
# features carry nothing, the ranking stays near the retriever's.
LTR_CONFIG = LtrConfig(init_score_column="retriever_score")
# Ten learnable val examples per fold at least; a user sample below it gets no ltr rows.
MIN_LTR_EXAMPLES = 10 * LTR_CONFIG.n_folds


def rankings_by_variant(rankings: Mapping[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
    """The loaded rankings partitions by variant (each table names its variant); an empty
    table ranked nothing and counts as missing."""
    out: dict[str, pl.DataFrame] = {}
    for key, frame in rankings.items():
        if frame.height == 0:
            continue
        names = frame["variant"].unique().to_list()
        assert len(names) == 1, f"rankings partition {key} mixes variants {names}"
        out[names[0]] = frame
    return out


@dataclass
class LlmRankers:
    """The ranked variants' ranks, their fusions with the retriever, and what the report says
    about them."""

    variants: list[str] = field(default_factory=list)
    ranks: list[pl.DataFrame] = field(default_factory=list)
    honest_val: list[pl.DataFrame] = field(default_factory=list)  # cross-fitted fusion val ranks
    fusion: list[dict[str, Any]] = field(default_factory=list)  # λ chosen on val, per fusion
    latency: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one log line per fusion


def llm_rankers(
    candidates: pl.DataFrame, by_variant: Mapping[str, pl.DataFrame], seed: int
) -> LlmRankers:
    """Each ranked variant's ranks and, where val was ranked, its fusion with the retriever
    (λ chosen on val, never on test)."""
    out = LlmRankers()
    for variant in VARIANTS:
        ranked = by_variant.get(variant)
        if ranked is None:
            continue
        out.ranks.append(llm_ranks(candidates, ranked, variant))
        out.variants.append(variant)
        if (ranked["split"] == "val").any():
            name = variant + PRIOR_SUFFIX
            fused, choice = fused_ranks(ranked, candidates)
            out.ranks.append(example_based_ranks(candidates, fused, name))
            out.fusion.append({"ranker": name, **choice.as_dict()})
            crossed = cross_fitted_val_ranks(ranked, candidates, seed=seed)
            if crossed is not None:  # else too few val examples: not a serving candidate
                out.honest_val.append(example_based_ranks(candidates, crossed, name))
            out.notes.append(f"{name}: {choice.describe()}")
        seconds = ranked["seconds"].to_numpy()
        out.latency.append(
            {
                "variant": variant,
                "prompts": len(seconds),
                "mean_s": float(seconds.mean()),
                "p50_s": float(np.percentile(seconds, 50)),
                "p95_s": float(np.percentile(seconds, 95)),
                "mean_tokens": float(ranked["n_tokens"].mean()),
            }
        )
    return out


def choice_ranks(ranks: list[pl.DataFrame], llm: LlmRankers) -> pl.DataFrame:
    """The ranks the served ranker is chosen on: every ranker's, with the fusions' val rows
    replaced by their cross-fitted ones."""
    fitted_on_val = [f["ranker"] for f in llm.fusion]
    kept = [r.filter(~pl.col("ranker").is_in(fitted_on_val)) for r in ranks]
    return pl.concat(kept + llm.honest_val)


@dataclass(frozen=True)
class LtrRanker:
    name: str  # ltr or ltr+llm
    ranks: pl.DataFrame  # (example_id, rank), val cross-fitted
    model: LtrResult
    summary: dict[str, Any]


def learnable_val_examples(candidates: pl.DataFrame) -> int:
    """Val examples whose true item is a candidate: what the rerankers learn from."""
    return candidates.filter((pl.col("split") == "val") & pl.col("in_candidates")).height


def ltr_rankers(
    evaluated: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
    pairs: pl.DataFrame,
    preference: pl.DataFrame,
    path_types: list[str],
    by_variant: Mapping[str, pl.DataFrame],
    log: Callable[[str], None] = lambda _: None,
) -> list[LtrRanker]:
    """`ltr` and, when a variant was ranked (lkg_rag first, one that ranked val before one
    that did not), `ltr+llm` with that LLM's score as one more feature, fitted on val
    (cross-fitted there) and scored on test; `ltr+llm` is left out (said through `log`) where
    the LLM ranked too few val examples to fit it on (test-only ranking runs)."""
    ranked = [v for v in ("lkg_rag", *VARIANTS) if v in by_variant]
    with_val = [v for v in ranked if (by_variant[v]["split"] == "val").any()]
    llm_variant = next(iter(with_val or ranked), None)
    llm = None if llm_variant is None else llm_scores(by_variant[llm_variant])
    out = []
    for name, with_llm in ((LTR, False), (LTR_LLM, True)):
        if with_llm and llm is None:
            continue
        rows = evaluated
        if with_llm:  # the LLM scored only the examples whose true item is a candidate
            rows = evaluated.join(llm.select("example_id").unique(), on="example_id", how="semi")
            learnable = learnable_val_examples(rows)
            if learnable < MIN_LTR_EXAMPLES:
                log(
                    f"{LTR_LLM} skipped: {llm_variant} ranked {learnable} validation examples "
                    f"with their true item among the candidates, fewer than the "
                    f"{MIN_LTR_EXAMPLES} it needs to fit and cross-fit (rank the val split too)"
                )
                continue
        features = feature_table(
            rows, sequences, pairs, items, preference, llm if with_llm else None,
            path_types=path_types,
        )  # fmt: skip
        columns = feature_names(features)
        result, ranks = fit_and_rank(features, columns, LTR_CONFIG)
        summary = {
            "llm_variant": llm_variant if with_llm else None,
            "features": columns,
            "best_iterations": result.best_iterations,
            "importances": result.importances.to_dicts(),
        }
        out.append(LtrRanker(name, ranks, result, summary))
    return out


def ltr_order(
    result: LtrResult,
    examples: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
    pair_features: pl.DataFrame,
    preference: pl.DataFrame,
    path_types: list[str],
    llm_ranked: pl.DataFrame | None,
) -> pl.DataFrame:
    """New examples' candidates ordered by a fitted reranker, their features made as for
    val/test (the LLM's scores only for `ltr+llm`)."""
    llm = None if llm_ranked is None else llm_scores(llm_ranked)
    features = feature_table(
        examples, sequences, pair_features, items, preference, llm, path_types=path_types
    )
    # feature rows are sorted by (example_id, position): one row of scores per example
    ordered = examples.sort("example_id")
    return ranked_by(ordered, score(result, features).reshape(ordered.height, -1))
