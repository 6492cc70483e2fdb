"""Score rules on the LLM's letter logits: a per-letter prior removed, the retriever as a prior.

A small LLM ranking lettered candidates learns letter priors long before content (zero-shot
SmolLM2 puts (A) first in every ml-100k prompt; fine-tuning moves the bias to another letter).
Two standard remedies, both computed from scores `rankings` already stores:

- calibration (Zhao et al. 2021, contextual calibration): subtract each letter's mean
  log-probability, estimated on validation prompts, so a letter that is always likely stops
  winning by position alone;
- fusion (Bruch et al. 2022, convex score combination): score = log-softmax(retriever over the
  20) + λ · log-softmax(LLM over the 20), λ chosen on validation. λ = 0 is the retriever
  itself, so the choice can only match or beat it on validation.

Everything here works on (N, 20) arrays in letter order (A first), the order prompts list the
candidates in; for val/test that is the retriever's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from lkg_pipeline.core.evaluate.metrics import ranking_metrics

# λ values tried on validation, smallest first: ties go to the smaller λ (closer to the
# retriever, the safer choice with a weak reranker).
LAMBDA_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
FUSION_METRIC = "NDCG@10"


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, C) scores, stable for large logits."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def retriever_log_prior(scores: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, 20) retriever scores; a candidate the retriever masked
    (-inf: an item already in the history) gets its row's lowest finite score instead, so
    that a true item seen before stays learnable (a finite loss)."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    assert finite.any(axis=1).all(), "a prompt has no finite retriever score"
    lowest = np.where(finite, scores, np.inf).min(axis=1, keepdims=True)
    scores = np.where(finite, scores, lowest)
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def letter_prior(llm_scores: np.ndarray) -> np.ndarray:
    """(C,) mean log-probability of each letter over the prompts given (validation ones)."""
    assert llm_scores.ndim == 2 and llm_scores.shape[0] >= 1, f"shape {llm_scores.shape}"
    return log_softmax(llm_scores).mean(axis=0)


def calibrated(llm_scores: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Log-probabilities with the per-letter prior removed."""
    return log_softmax(llm_scores) - prior[None, :]


def fused(
    llm_scores: np.ndarray,
    retriever_scores: np.ndarray,
    lam: float,
    prior: np.ndarray | None = None,
) -> np.ndarray:
    """log-softmax(retriever) + λ · log-softmax(LLM) (minus the letter prior when given)."""
    assert llm_scores.shape == retriever_scores.shape, (
        f"LLM scores {llm_scores.shape} vs retriever scores {retriever_scores.shape}"
    )
    llm = calibrated(llm_scores, prior) if prior is not None else log_softmax(llm_scores)
    return log_softmax(retriever_scores) + lam * llm


def target_ranks(scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """1-based rank of each row's target; ties go to the earlier letter (the stable rule every
    stage uses, `metrics.rank_of_target(tie_break="index")`)."""
    n, c = scores.shape
    target = scores[np.arange(n), target_index][:, None]
    columns = np.arange(c)[None, :]
    better = (scores > target) | ((scores == target) & (columns < target_index[:, None]))
    return better.sum(axis=1) + 1


@dataclass(frozen=True)
class FusionChoice:
    lam: float
    calibrate: bool
    prior: np.ndarray | None  # the letter prior estimated on validation, when calibrating
    grid: pl.DataFrame  # lam, calibrate, the validation metric of each setting
    metric: str

    def as_dict(self) -> dict[str, object]:
        """What the report stores: enough for `recommendations` to apply the same fusion."""
        return {
            "choice": self.describe(),
            "lam": self.lam,
            "calibrate": self.calibrate,
            "prior": None if self.prior is None else self.prior.tolist(),
        }

    def describe(self) -> str:
        best = self.grid.filter(
            (pl.col("lam") == self.lam) & (pl.col("calibrate") == self.calibrate)
        )[self.metric][0]
        return (
            f"λ = {self.lam:g}{' with the letter prior removed' if self.calibrate else ''}: "
            f"val subset {self.metric} {best:.4f} (λ = 0, the retriever: "
            f"{self.grid.filter(pl.col('lam') == 0.0)[self.metric][0]:.4f})"
        )


def choose_fusion(
    llm_val: np.ndarray,
    retriever_val: np.ndarray,
    target_val: np.ndarray,
    grid: Sequence[float] = LAMBDA_GRID,
    metric: str = FUSION_METRIC,
    calibrate_options: Sequence[bool] = (False, True),
) -> FusionChoice:
    """The (λ, calibrate) with the best validation `metric`; ties: the smaller λ, uncalibrated.

    Only validation prompts whose true item is a candidate are passed in (the only ones whose
    rank the fusion changes); the test split is never looked at here.
    """
    assert llm_val.shape[0] == target_val.shape[0] >= 1, "no validation prompts to choose λ on"
    assert sorted(grid) == list(grid) and grid[0] == 0.0, "grid must start at 0 and increase"
    prior = letter_prior(llm_val)
    rows = []
    for calibrate in calibrate_options:
        for lam in grid:
            scores = fused(llm_val, retriever_val, lam, prior if calibrate else None)
            values = ranking_metrics(target_ranks(scores, target_val).astype(float), (1, 5, 10))
            rows.append({"lam": float(lam), "calibrate": calibrate, **values})
    table = pl.DataFrame(rows)
    best_value = table[metric].max()
    # first row reaching the best value within float noise: smallest λ, uncalibrated first
    winner = table.filter(pl.col(metric) >= best_value - 1e-12).row(0, named=True)
    return FusionChoice(
        lam=winner["lam"],
        calibrate=winner["calibrate"],
        prior=prior if winner["calibrate"] else None,
        grid=table,
        metric=metric,
    )


def letter_scores(rankings: pl.DataFrame, candidates: pl.DataFrame) -> pl.DataFrame:
    """Per example: the LLM's scores and the retriever's, both in letter order, and the target.

    `rankings` stores candidates best first; this puts each score back under its letter by
    matching items to the prompt's candidate list (`candidates`' order for val/test).
    """
    joined = rankings.select(
        "example_id", "split", "ranked_item_idxs", "ranked_scores", "target_item_idx"
    ).join(
        candidates.select("example_id", "candidate_item_idxs", "candidate_scores"),
        on="example_id",
        how="inner",
    )
    assert joined.height == rankings.height, (
        f"{rankings.height - joined.height} ranked examples are not in candidates"
    )
    assert joined["candidate_scores"].null_count() == 0, "fusion needs val/test examples only"
    llm_rows, target_rows = [], []
    for ranked, ranked_scores, target, letters in joined.select(
        "ranked_item_idxs", "ranked_scores", "target_item_idx", "candidate_item_idxs"
    ).iter_rows():
        by_item = dict(zip(ranked, ranked_scores, strict=True))
        assert set(by_item) == set(letters), "rankings and candidates list different items"
        llm_rows.append([by_item[i] for i in letters])
        target_rows.append(letters.index(target) if target is not None else -1)
    return pl.DataFrame(
        {
            "example_id": joined["example_id"],
            "split": joined["split"],
            "llm": llm_rows,
            "retriever": joined["candidate_scores"],
            "target_index": target_rows,
        },
        schema={
            "example_id": pl.Int64,
            "split": pl.String,
            "llm": pl.List(pl.Float64),
            "retriever": pl.List(pl.Float64),
            "target_index": pl.Int64,
        },
    )


def as_arrays(rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(llm (N, 20), retriever (N, 20), target_index (N,)) of `letter_scores` rows."""
    llm = np.asarray(rows["llm"].to_list(), dtype=np.float64).reshape(rows.height, -1)
    retriever = np.asarray(rows["retriever"].to_list(), dtype=np.float64).reshape(rows.height, -1)
    return llm, retriever, rows["target_index"].to_numpy()


def fused_ranks(
    rankings: pl.DataFrame, candidates: pl.DataFrame
) -> tuple[pl.DataFrame, FusionChoice]:
    """(example_id, rank) of the fused ranker on every ranked example, and the λ chosen on val.

    Needs validation rankings (`rankings` with splits val and test): without them there is
    nothing to choose λ on, which is an error rather than a silent default.
    """
    rows = letter_scores(rankings, candidates)
    known = rows.filter(pl.col("target_index") >= 0)
    val = known.filter(pl.col("split") == "val")
    if val.height == 0:
        raise ValueError(
            "no validation rankings with the true item among the candidates: rank the val "
            "split too (rankings config splits: [val, test]) to choose the fusion weight"
        )
    choice = choose_fusion(*as_arrays(val))
    llm, retriever, target = as_arrays(known)
    scores = fused(llm, retriever, choice.lam, choice.prior)
    ranks = target_ranks(scores, target)
    ranked = known.select("example_id").with_columns(rank=pl.Series(ranks, dtype=pl.Float64))
    return ranked, choice


def cross_fitted_val_ranks(
    rankings: pl.DataFrame, candidates: pl.DataFrame, n_folds: int = 5, seed: int = 0
) -> pl.DataFrame | None:
    """(example_id, rank) of the fused ranker on validation, each example's λ chosen on the
    other folds' examples only.

    `fused_ranks` picks λ on the very validation examples it then ranks, so its validation
    figure is optimistic by construction; deciding what to serve on that figure would favour
    the fusion over rankers with nothing tuned on validation. Cross-fitting removes that.
    None when there are fewer than two validation examples per fold (a user sample): then
    there is no honest validation figure, and the fusion cannot be chosen to serve.
    """
    assert n_folds >= 2, f"n_folds={n_folds} must be >= 2"
    rows = letter_scores(rankings, candidates)
    val = rows.filter((pl.col("target_index") >= 0) & (pl.col("split") == "val"))
    if val.height < 2 * n_folds:
        return None
    fold = val_folds(val.height, n_folds, seed)
    llm, retriever, target = as_arrays(val)
    ranks = np.empty(val.height, dtype=np.float64)
    for f in range(n_folds):
        held, fit = fold == f, fold != f
        choice = choose_fusion(llm[fit], retriever[fit], target[fit])
        scores = fused(llm[held], retriever[held], choice.lam, choice.prior)
        ranks[held] = target_ranks(scores, target[held])
    return val.select("example_id").with_columns(rank=pl.Series(ranks))


def val_folds(n: int, n_folds: int, seed: int) -> np.ndarray:
    """(n,) fold of each validation example: a seeded shuffle dealt round-robin."""
    return np.random.default_rng(seed).permutation(n) % n_folds
