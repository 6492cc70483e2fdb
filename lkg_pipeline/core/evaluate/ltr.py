"""A learned reranker (`ltr`): LightGBM lambdarank over explicit features of each candidate.

No LLM of ≤ 0.5B trained on these machines beats the retriever (shared DESIGN.md §6), and the
way LLM output reached production elsewhere is as a feature of a conventional ranker (KAR).
This module is that ranker: for each of an example's candidates it reads the features of
`ltr_features` (the retriever's view, popularity, KG path counts, and when given the preference
module's and the LLM's scores); a lambdarank model learns how much to trust each.

What it learns from: the **validation** examples whose true item is among the candidates.
Train-prefix examples are not used: the shared retriever was fitted on them, so its scores
and ranks there are sharper than on unseen prefixes (ml-100k: the true item is among the 20
candidates for 44% of train prefixes, 32% of val/test examples), and a model fitted there
learns to trust the retriever more than it deserves on val/test. Val examples are scored as
test ones are, by a retriever not fitted on their targets.

Cross-fitting over users: the val estimate is what decides which ranker the product serves,
so it must be honest. Users are split into `n_folds` folds; the model that scores fold k is
fitted on the other folds except fold k+1, which early-stops it, so no val user's score comes
from a model that saw that user (nor was stopped on them). The served model is then fitted on
every val user with the mean of the folds' best iterations, and scores test (and `next`, the
full-history split of serving).

Some inputs were chosen with val in view (the retriever's and the preference module's best
epoch, the LLM's checkpoint): their val scores, hence the val estimate, are slightly
optimistic, for every ranker compared on val alike.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl

from lkg_pipeline.core.evaluate.ltr_features import ID_COLUMNS, require_columns
from lkg_pipeline.core.io.storage import replace_dir_atomically

MODEL_FILE = "ltr_model.txt"  # LightGBM's own text format
META_FILE = "ltr.json"  # config, feature columns, folds' best iterations, importances
VAL_SCORES_FILE = "val_scores.parquet"  # the cross-fitted val scores


@dataclass(frozen=True)
class LtrConfig:
    num_leaves: int = 15  # small trees: ~300 val examples to learn from on ml-100k (32% of 943)
    learning_rate: float = 0.05
    n_estimators: int = 500  # the most trees a fold model may grow before early stopping
    early_stopping_rounds: int = 50  # rounds without a better NDCG@eval_at on the stop fold
    min_data_in_leaf: int = 20
    lambdarank_truncation_level: int = 20  # every one of the 20 candidates counts in the loss
    eval_at: int = 10  # NDCG cutoff that early stopping watches (the reported NDCG@10)
    n_folds: int = 5  # user folds of the cross-fit: 3/5 fit, 1/5 stops, 1/5 is scored
    train_split: str = "val"  # the split the model learns from (see the module docstring)
    # A column (e.g. "retriever_score") boosting starts from: trees then learn a correction to
    # it, and where the features carry nothing the ranking stays near that column's order. On
    # the tests' synthetic data (6 seeds) the cross-fitted NDCG@10 without a signal is 0.057
    # below the retriever's from zero, 0.012 from the retriever's score; with the planted
    # signal both gain +0.29. None (the default): from zero.
    init_score_column: str | None = None
    seed: int = 0
    deterministic: bool = True  # with force_row_wise and fixed threads: same scores every run
    # 1: val is ~20k rows on ml-100k, too few for threads to pay, and on a busy 2-core machine
    # OpenMP threads spin against each other (a test fit: 0.2 s with 1 thread, 106 s with 2)
    num_threads: int = 1
    verbose: int = -1

    def __post_init__(self) -> None:
        if self.n_folds < 3:
            raise ValueError(f"n_folds={self.n_folds}: one fold scores, one stops, ≥1 fits")
        if self.num_leaves < 2:
            raise ValueError(f"num_leaves={self.num_leaves} must be ≥ 2")
        if not (self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if self.n_estimators < 1:
            raise ValueError(f"n_estimators={self.n_estimators} must be ≥ 1")
        if self.early_stopping_rounds < 1:
            raise ValueError("early_stopping_rounds must be ≥ 1")
        if self.eval_at < 1:
            raise ValueError(f"eval_at={self.eval_at} must be ≥ 1")

    def params(self) -> dict:
        """LightGBM's parameters for this config."""
        return {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [self.eval_at],
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "lambdarank_truncation_level": self.lambdarank_truncation_level,
            "seed": self.seed,
            "deterministic": self.deterministic,
            "force_row_wise": True,
            "num_threads": self.num_threads,
            "verbose": self.verbose,
        }


@dataclass
class LtrResult:
    booster: lgb.Booster  # the served model, fitted on every val user
    feature_columns: list[str]
    config: LtrConfig
    # (example_id, user_idx, fold, position, score): every train_split row in the feature
    # table's order, scored by the model of its user's fold, which never saw that user
    val_scores: pl.DataFrame
    best_iterations: list[int]  # of each fold model, on its stop fold
    importances: pl.DataFrame  # (feature, gain) of the served model, descending


def _positives(features: pl.DataFrame) -> pl.DataFrame:
    """(example_id, positives): label-1 rows per example; more than one is an error."""
    labels = features["label"]
    if not labels.is_in([0, 1]).all():
        raise ValueError("label must be 0 or 1")
    counts = features.group_by("example_id").agg(positives=pl.col("label").cast(pl.Int64).sum())
    bad = counts.filter(pl.col("positives") > 1)
    if bad.height:
        raise ValueError(
            f"{bad.height} examples have more than one label-1 row (e.g. example_id "
            f"{bad['example_id'].min()}): each example has one true item"
        )
    return counts


def _user_folds(users: pl.Series, config: LtrConfig) -> pl.DataFrame:
    """(user_idx, fold): users shuffled by the seed and dealt round-robin into n_folds."""
    unique = np.unique(users.to_numpy())
    order = np.random.default_rng(config.seed).permutation(len(unique))
    fold = np.empty(len(unique), dtype=np.int32)
    fold[order] = np.arange(len(unique)) % config.n_folds
    return pl.DataFrame({"user_idx": unique, "fold": fold})


def _matrix(features: pl.DataFrame, columns: Sequence[str]) -> np.ndarray:
    return features.select(pl.col(columns).cast(pl.Float64)).to_numpy()


def _dataset(
    rows: pl.DataFrame, columns: list[str], config: LtrConfig, reference: lgb.Dataset | None = None
) -> lgb.Dataset:
    """Rows in (example, position) order: LightGBM's query groups are runs of rows."""
    groups = rows.group_by("example_id", maintain_order=True).len()["len"].to_numpy()
    return lgb.Dataset(
        _matrix(rows, columns),
        label=rows["label"].to_numpy(),
        group=groups,
        feature_name=columns,
        params=config.params(),
        reference=reference,
        init_score=_base(rows, config),
    )


def _base(rows: pl.DataFrame, config: LtrConfig) -> np.ndarray | None:
    """(rows,) the scores boosting starts from (`LtrConfig.init_score_column`), or None."""
    if config.init_score_column is None:
        return None
    return rows[config.init_score_column].cast(pl.Float64).to_numpy()


def _predict(
    booster: lgb.Booster, rows: pl.DataFrame, columns: list[str], config: LtrConfig, trees: int
) -> np.ndarray:
    """(rows,) the booster's first `trees` trees (≤ 0: all) plus the starting scores."""
    raw = booster.predict(
        _matrix(rows, columns), num_iteration=trees, num_threads=config.num_threads
    )
    base = _base(rows, config)
    return raw if base is None else raw + base


def _fit_fold(subset: pl.DataFrame, columns: list[str], config: LtrConfig, k: int) -> lgb.Booster:
    """The model that scores fold k: fitted on the folds other than k and k+1, stopped early
    on fold k+1."""
    stop = (k + 1) % config.n_folds
    fit_rows = subset.filter(~pl.col("fold").is_in([k, stop]))
    stop_rows = subset.filter(pl.col("fold") == stop)
    if not fit_rows.height or not stop_rows.height:
        raise ValueError(
            f"fold {k}: no {config.train_split} examples with the true item among the "
            f"candidates to fit on or to stop on; need more users than n_folds={config.n_folds}"
        )
    train = _dataset(fit_rows, columns, config)
    return lgb.train(
        config.params(),
        train,
        num_boost_round=config.n_estimators,
        valid_sets=[_dataset(stop_rows, columns, config, reference=train)],
        callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False)],
    )


def fit_ltr(
    features: pl.DataFrame, feature_columns: list[str], config: LtrConfig = LtrConfig()
) -> LtrResult:
    """Cross-fitted val scores and the served model (see the module docstring), from the
    `config.train_split` rows of a `feature_table`; only examples with the true item among the
    candidates are learnt from, but every row of the split gets a cross-fitted score."""
    columns = list(feature_columns)
    init = [config.init_score_column] if config.init_score_column else []
    require_columns(features, [*ID_COLUMNS, *columns, *init], "features")
    val = features.filter(pl.col("split") == config.train_split).sort("example_id", "position")
    positives = _positives(val)
    folds = _user_folds(val["user_idx"], config)
    val = val.with_columns(fold=pl.col("user_idx").replace_strict(folds["user_idx"], folds["fold"]))
    learnt = positives.filter(pl.col("positives") == 1)["example_id"]
    subset = val.filter(pl.col("example_id").is_in(learnt.implode()))
    scores = np.full(val.height, np.nan)
    best = []
    for k in range(config.n_folds):
        booster = _fit_fold(subset, columns, config, k)
        best.append(int(booster.best_iteration))
        mine = (val["fold"] == k).to_numpy()
        mine_rows = val.filter(pl.col("fold") == k)
        scores[mine] = _predict(booster, mine_rows, columns, config, booster.best_iteration)
    n_trees = max(1, round(float(np.mean(best))))
    final = lgb.train(config.params(), _dataset(subset, columns, config), num_boost_round=n_trees)
    return LtrResult(
        booster=final,
        feature_columns=columns,
        config=config,
        val_scores=val.select("example_id", "user_idx", "fold", "position").with_columns(
            score=pl.Series(scores)
        ),
        best_iterations=best,
        importances=_importances(final, columns),
    )


def _importances(booster: lgb.Booster, columns: list[str]) -> pl.DataFrame:
    gain = booster.feature_importance(importance_type="gain")
    return pl.DataFrame({"feature": columns, "gain": gain.astype(np.float64)}).sort(
        ["gain", "feature"], descending=[True, False]
    )


def score(result: LtrResult, features: pl.DataFrame) -> np.ndarray:
    """(rows,) the served model's score of each row of `features`, in its order."""
    config = result.config
    init = [config.init_score_column] if config.init_score_column else []
    require_columns(features, [*result.feature_columns, *init], "features")
    # every tree: the served model was grown to its chosen size
    return _predict(result.booster, features, result.feature_columns, config, trees=-1)


def ranks_from_scores(features: pl.DataFrame, scores: np.ndarray) -> pl.DataFrame:
    """(example_id, rank): the 1-based rank of each example's label-1 row under `scores`
    (aligned with `features`' rows), ties to the lower position (`fusion.target_ranks`' rule).
    Examples without a label-1 row (true item not a candidate, or `next`) are omitted."""
    require_columns(features, ["example_id", "position", "label"], "features")
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(values) != features.height:
        raise ValueError(f"{len(values)} scores for {features.height} rows")
    if np.isnan(values).any():
        raise ValueError("scores contain NaN")
    _positives(features)
    rows = features.select("example_id", "position", "label").with_columns(score=values)
    target = rows.filter(pl.col("label") == 1).select(
        "example_id", target_score="score", target_position="position"
    )
    s, t = pl.col("score"), pl.col("target_score")
    better = (s > t) | ((s == t) & (pl.col("position") < pl.col("target_position")))
    return (
        rows.join(target, on="example_id")
        .group_by("example_id")
        .agg(rank=better.sum().cast(pl.Int64) + 1)
        .sort("example_id")
    )


def save_ltr(result: LtrResult, folder: str | Path) -> Path:
    """`folder` (the model's own: it is replaced whole, atomically) with the served model in
    LightGBM's text format, what made it (config, feature columns, the folds' best iterations,
    the LightGBM version) and the cross-fitted val scores."""
    folder = Path(folder)
    meta = {
        "config": dataclasses.asdict(result.config),
        "feature_columns": result.feature_columns,
        "best_iterations": result.best_iterations,
        "importances": result.importances.to_dicts(),
        "lightgbm_version": lgb.__version__,
    }

    def write(staging: Path) -> None:
        result.booster.save_model(str(staging / MODEL_FILE), num_iteration=-1)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        result.val_scores.write_parquet(staging / VAL_SCORES_FILE)

    replace_dir_atomically(folder, write)
    return folder


def load_ltr(folder: str | Path) -> LtrResult:
    """What `save_ltr` wrote; the model scores exactly as the saved one did."""
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    booster = lgb.Booster(model_file=str(folder / MODEL_FILE))
    columns = list(meta["feature_columns"])
    if booster.feature_name() != columns:
        raise ValueError(f"{folder}: model features {booster.feature_name()} ≠ {columns}")
    return LtrResult(
        booster=booster,
        feature_columns=columns,
        config=LtrConfig(**meta["config"]),
        val_scores=pl.read_parquet(folder / VAL_SCORES_FILE),
        best_iterations=list(meta["best_iterations"]),
        importances=pl.DataFrame(
            meta["importances"], schema={"feature": pl.String, "gain": pl.Float64}
        ),
    )


def fit_and_rank(
    features: pl.DataFrame, feature_columns: list[str], config: LtrConfig = LtrConfig()
) -> tuple[LtrResult, pl.DataFrame]:
    """The fitted reranker and (example_id, rank) of every example with its true item among
    the candidates: cross-fitted on `config.train_split` (the honest val figure), the served
    model on every other split (test)."""
    result = fit_ltr(features, feature_columns, config)
    fitted = features.filter(pl.col("split") == config.train_split).sort("example_id", "position")
    others = features.filter(pl.col("split") != config.train_split)
    parts = [ranks_from_scores(fitted, result.val_scores["score"].to_numpy())]
    if others.height:
        parts.append(ranks_from_scores(others, score(result, others)))
    return result, pl.concat(parts)
