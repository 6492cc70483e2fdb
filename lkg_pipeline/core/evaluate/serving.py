"""Which ranker the product serves: the one validation picks, and the retriever unless beaten.

On ml-100k every fine-tuned small LLM ranks worse than the retriever it reranks
(docs/report.md#what-it-says-on-ml-100k), so a product that always served the LLM's order
would serve its own worst stage. The rule here:

- the challenger is the servable ranker with the best validation NDCG@10 over every user
  (overall population: users whose true item the retriever missed count as misses);
- it is served only if it beats the retriever on validation by more than the noise: a higher
  mean and a paired sign-flip p below `SIGNIFICANCE` (the test the report uses). A tie or a
  gain within the noise serves the retriever, the cheaper and the proven ranker;
- a run configuration can force any available ranker by name.

The validation values given here must be honest: a ranker whose own settings were chosen on
validation (the `+prior` fusion's λ) is passed in with cross-fitted validation ranks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from lkg_pipeline.core.evaluate.compare import (
    PRIOR_SUFFIX,
    RETRIEVER,
    SIGNIFICANCE,
    paired_randomization_test,
)
from lkg_pipeline.core.evaluate.metrics import per_user_metrics
from lkg_pipeline.core.llm.prompts import VARIANTS
from lkg_pipeline.core.llm.rank.fusion import fused, letter_scores

CHOICE_METRIC = "NDCG@10"
LTR = "ltr"
LTR_LLM = "ltr+llm"
# What `recommendations` knows how to rank with.
SERVABLE = (RETRIEVER, *VARIANTS, *(v + PRIOR_SUFFIX for v in VARIANTS), LTR, LTR_LLM)


@dataclass(frozen=True)
class ServedChoice:
    served: str
    runner_up: str | None  # the next ranker in validation order
    forced: bool  # named by the run configuration rather than chosen
    reason: str  # one sentence a person reads first
    evidence: pl.DataFrame  # ranker, val_<metric>, delta_vs_retriever, p_vs_retriever, n_users

    def as_dict(self) -> dict[str, Any]:
        return {
            "served": self.served,
            "runner_up": self.runner_up,
            "forced": self.forced,
            "reason": self.reason,
            "metric": CHOICE_METRIC,
            "population": "overall",
            "split": "val",
            "evidence": self.evidence.to_dicts(),
        }


def _per_user(val_ranks: pl.DataFrame, rankers: Sequence[str]) -> np.ndarray:
    """(U, R) per-user metric, every ranker on the same users in the same order."""
    users = np.sort(val_ranks.filter(pl.col("ranker") == RETRIEVER)["user_idx"].to_numpy())
    columns = []
    for ranker in rankers:
        rows = val_ranks.filter(pl.col("ranker") == ranker).sort("user_idx")
        if not np.array_equal(rows["user_idx"].to_numpy(), users):
            raise ValueError(
                f"{ranker}: validation ranks cover {rows.height} users, the retriever's "
                f"{len(users)}: every ranker must be scored on the same validation users"
            )
        columns.append(per_user_metrics(rows["rank"].to_numpy(), (10,))[CHOICE_METRIC])
    return np.stack(columns, axis=1)


def choose_served(
    val_ranks: pl.DataFrame,
    forced: str | None = None,
    alpha: float = SIGNIFICANCE,
    n_permutations: int = 10_000,
    seed: int = 0,
    servable: Sequence[str] = SERVABLE,
) -> ServedChoice:
    """The served ranker from validation ranks (`evaluation.RANK_COLUMNS` rows, split val).

    Rankers outside `servable` (by default what `recommendations` can rank with; the preference
    module is not) are shown nowhere here: they are not candidates for serving. The retriever
    is always one.
    """
    val_ranks = val_ranks.filter(pl.col("split") == "val")
    present = set(val_ranks["ranker"].unique().to_list())
    if RETRIEVER not in present:
        raise ValueError("no validation ranks of the retriever: nothing to compare with")
    rankers = [r for r in dict.fromkeys((RETRIEVER, *servable)) if r in present]
    values = _per_user(val_ranks, rankers)  # (U, R)
    base = values[:, rankers.index(RETRIEVER)]
    p = paired_randomization_test(
        values,
        np.repeat(base[:, None], len(rankers), 1),
        n_permutations,
        np.random.default_rng(seed),
    )
    means = values.mean(axis=0)
    evidence = pl.DataFrame(
        {
            "ranker": rankers,
            f"val_{CHOICE_METRIC}": means,
            "delta_vs_retriever": means - means[rankers.index(RETRIEVER)],
            "p_vs_retriever": np.where(np.array(rankers) == RETRIEVER, 1.0, p),
            "n_users": [values.shape[0]] * len(rankers),
        }
    ).sort(f"val_{CHOICE_METRIC}", descending=True, maintain_order=True)
    order = evidence["ranker"].to_list()
    if forced is not None:
        if forced not in present:
            raise ValueError(
                f"ranker {forced!r} cannot be served: it has no validation ranks in the report "
                f"(available: {', '.join(rankers)})"
            )
        others = [r for r in order if r != forced]
        return ServedChoice(forced, others[0] if others else None, True,
                            f"{forced} forced by the run configuration", evidence)  # fmt: skip
    row = {r["ranker"]: r for r in evidence.to_dicts()}
    challengers = [r for r in order if r != RETRIEVER]
    best = challengers[0] if challengers else None
    metric = f"val_{CHOICE_METRIC}"
    if (
        best is not None
        and row[best]["delta_vs_retriever"] > 0
        and row[best]["p_vs_retriever"] < alpha
    ):
        others = [r for r in order if r != best]
        reason = (
            f"{best} beats the retriever on validation {CHOICE_METRIC}: "
            f"{row[best][metric]:.4f} vs {row[RETRIEVER][metric]:.4f} "
            f"(paired p = {row[best]['p_vs_retriever']:.3g} < {alpha:g})"
        )
        return ServedChoice(best, others[0], False, reason, evidence)
    if best is None:
        reason = "the retriever is the only ranker with validation ranks"
    else:
        reason = (
            f"no ranker beats the retriever on validation {CHOICE_METRIC} beyond the noise: "
            f"best challenger {best} {row[best][metric]:.4f} vs {row[RETRIEVER][metric]:.4f} "
            f"(paired p = {row[best]['p_vs_retriever']:.3g}; served needs higher and p < {alpha:g})"
        )
    return ServedChoice(RETRIEVER, best, False, reason, evidence)


def retriever_order(examples: pl.DataFrame) -> pl.DataFrame:
    """`examples`' candidates as a ranking (rank_llm's columns), in the retriever's order."""
    return examples.select(
        "example_id",
        "user_idx",
        ranked_item_idxs="candidate_item_idxs",
        ranked_scores=pl.col("candidate_scores").cast(pl.List(pl.Float64)),
    )


def fused_order(
    ranked: pl.DataFrame, examples: pl.DataFrame, lam: float, prior: np.ndarray | None
) -> pl.DataFrame:
    """The LLM's `ranked` candidates re-ordered by the `+prior` fusion with weight `lam`."""
    rows = letter_scores(ranked, examples)
    llm = np.asarray(rows["llm"].to_list(), dtype=np.float64)
    retriever = np.asarray(rows["retriever"].to_list(), dtype=np.float64)
    scores = fused(llm, retriever, lam, prior)  # (N, 20) in letter order
    letters = rows.select("example_id").join(
        examples, on="example_id", how="left", maintain_order="left"
    )
    return ranked_by(letters, scores)


def ranked_by(examples: pl.DataFrame, scores: np.ndarray) -> pl.DataFrame:
    """`examples`' candidates re-ordered by `scores` ((N, K), row i = example i's candidates
    in list order), best first, ties to the earlier candidate; rank_llm's columns."""
    items = np.asarray(examples["candidate_item_idxs"].to_list())  # (N, K)
    assert items.shape == scores.shape, f"candidates {items.shape} vs scores {scores.shape}"
    order = np.argsort(-scores, axis=1, kind="stable")
    return pl.DataFrame(
        {
            "example_id": examples["example_id"],
            "user_idx": examples["user_idx"],
            "ranked_item_idxs": np.take_along_axis(items, order, 1).tolist(),
            "ranked_scores": np.take_along_axis(scores, order, 1).tolist(),
        }
    )


def served_summary(choice: ServedChoice, comparisons: pl.DataFrame) -> dict[str, Any]:
    """The choice plus the served ranker's test row against the retriever (overall, paired p),
    so a reader sees whether what validation picked holds on test."""
    out = choice.as_dict()
    if choice.served == RETRIEVER:
        out["test"] = {"note": "the retriever itself: its test row is the retriever's"}
        return out
    row = comparisons.filter(
        (pl.col("ranker") == choice.served)
        & (pl.col("baseline") == RETRIEVER)
        & (pl.col("split") == "test")
        & (pl.col("population") == "overall")
        & (pl.col("metric") == CHOICE_METRIC)
    )
    out["test"] = row.select(
        "value", "baseline_value", "difference", "p_value", "n_users"
    ).to_dicts()[0] if row.height else {"note": "no test ranks"}  # fmt: skip
    return out


def served_lines(summary: dict[str, Any]) -> list[str]:
    """The report's first lines: what is served, why, the runner-up and the test check."""
    from lkg_pipeline.core.io.tables import markdown_table

    lines = [
        f"**Served ranker: `{summary['served']}`** — {summary['reason']}.",
        "",
        f"- Runner-up on validation: `{summary['runner_up']}`.",
    ]
    test = summary.get("test", {})
    if "p_value" in test:
        lines.append(
            f"- On test (overall, {test['n_users']} users): {summary['served']} "
            f"{CHOICE_METRIC} {test['value']:.4f} vs retriever {test['baseline_value']:.4f} "
            f"({test['difference']:+.4f}, paired p = {test['p_value']:.3g})."
        )
    elif "note" in test:
        lines.append(f"- On test: {test['note']}.")
    evidence = pl.DataFrame(summary["evidence"])
    lines += [
        "",
        "Validation evidence (overall population, every user). Rankers fitted on validation "
        "(`+prior` fusions' λ, `ltr`) are judged on cross-fitted ranks: each user ranked by a "
        "fit that did not see them. The val tables below show `+prior` with λ fitted on all "
        "of validation, so their figures for it can differ from these.",
        "",
    ]
    lines += [markdown_table(evidence.with_columns(pl.selectors.float().round(4))), ""]
    return lines


def serving_plan(report_file: Path, dataset: str, forced: str | None) -> dict[str, Any]:
    """What `recommendations` ranks with: the report's served ranker (or `forced`), the LLM
    variant it needs (None: no LLM forward) and, for `<variant>+prior`, the report's fusion."""
    if forced == RETRIEVER:  # always servable: no report needed (no LLM stage has to run)
        return {"ranker": RETRIEVER, "forced": True, "because": "forced by run config",
                "runner_up": None, "variant": None, "fusion": None}  # fmt: skip
    if not report_file.exists():
        raise FileNotFoundError(
            f"{report_file} does not exist: materialise evaluation_report for {dataset} first "
            "(it chooses the ranker to serve on validation), or name one with config `ranker`"
        )
    report = json.loads(report_file.read_text())
    if "served" not in report:
        raise ValueError(f"{report_file} predates the served-ranker choice: re-materialise it")
    available = [row["ranker"] for row in report["served"]["evidence"]]
    ranker = forced or report["served"]["served"]
    if ranker not in SERVABLE or ranker not in available:
        raise ValueError(
            f"ranker {ranker!r} cannot be served for {dataset}: the report has validation ranks "
            f"for {', '.join(available)} (servable kinds: {', '.join(SERVABLE)})"
        )
    variant = None if ranker in (RETRIEVER, LTR) else ranker.removesuffix(PRIOR_SUFFIX)
    if ranker == LTR_LLM:  # the LLM whose scores the reranker was fitted on
        variant = next(r["llm_variant"] for r in report["ltr"] if r["ranker"] == LTR_LLM)
    fusion = next((f for f in report.get("fusion", []) if f["ranker"] == ranker), None)
    if ranker.endswith(PRIOR_SUFFIX) and fusion is None:
        raise ValueError(f"{report_file} has no fusion weight for {ranker}: re-materialise it")
    return {
        "ranker": ranker,
        "forced": forced is not None,
        "because": "forced by run config" if forced else report["served"]["reason"],
        # validation's choice when forced, else validation's runner-up
        "runner_up": report["served"]["served"] if forced else report["served"]["runner_up"],
        "variant": variant,
        "fusion": fusion,
    }
