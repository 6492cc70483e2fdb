"""A learned reranker (`ltr`): LightGBM lambdarank over explicit features of each candidate.

No LLM of ≤ 0.5B trained on these machines beats the retriever (shared DESIGN.md §6), and the
way LLM output reached production elsewhere is as a feature of a conventional ranker (KAR).
This module is that ranker: for each of an example's candidates it reads what the retriever
thought (score, rank, distance to the top and to the list's mean), how popular the item is
overall and next to the user's history, how the KG links the history to it (path counts per
relation type), and, when given, the preference module's and the LLM's scores; a lambdarank
model learns how much to trust each.

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

Recency: kg_paths' `pair_features` table holds, per (example, candidate, path type), the count
of paths from all of the example's last `PathConfig.history_len` history items, without the
history item they start from, so the counts cannot be weighted by its recency: the path
features here are plain counts. (Only `paths.parquet` knows the history position, and it keeps
at most `max_paths_per_pair` paths per item pair: enough to say which history items reach a
candidate, not how many paths of each type they have.)
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

from lkg_pipeline.core.io.storage import replace_dir_atomically
from lkg_pipeline.core.paths.preference_grid import FEATURE_COLUMNS

# What identifies a row of the feature table; every other column is a feature.
ID_COLUMNS = ("example_id", "user_idx", "split", "position", "candidate_item_idx", "label")
CANDIDATE_COLUMNS = (
    "example_id", "user_idx", "split", "prefix_len", "target_item_idx",
    "candidate_item_idxs", "candidate_scores",
)  # fmt: skip
PATH_PREFIX = "paths_"  # one feature column per path type: paths_directed_by, ...
MODEL_FILE = "ltr_model.txt"  # LightGBM's own text format
META_FILE = "ltr.json"  # config, feature columns, folds' best iterations, importances
VAL_SCORES_FILE = "val_scores.parquet"  # the cross-fitted val scores
KEYS = ["example_id", "candidate_item_idx"]


def _require(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks the columns {missing}; it has {frame.columns}")


def read_pair_features(folder: str | Path, example_ids: pl.Series) -> pl.DataFrame:
    """(example_id, candidate_item_idx, path_type, n_paths) of `example_ids` from kg_paths'
    `folder/pair_features.parquet`, streamed: the file holds every train prefix too (102M
    rows at 1M Beauty-like users), and only the rows kept are ever in memory."""
    wanted = example_ids.cast(pl.Int64).implode()
    return (
        pl.scan_parquet(Path(folder) / "pair_features.parquet")
        .select(FEATURE_COLUMNS)
        .filter(pl.col("example_id").cast(pl.Int64).is_in(wanted))
        .collect(engine="streaming")
    )


def _candidate_rows(candidates: pl.DataFrame) -> pl.DataFrame:
    """One row per (example, candidate) with its position, label and retriever score."""
    _require(candidates, CANDIDATE_COLUMNS, "candidates")
    if candidates["example_id"].n_unique() != candidates.height:
        raise ValueError("candidates: example_id must be unique")
    items, scores = pl.col("candidate_item_idxs"), pl.col("candidate_scores")
    bad = candidates.filter(
        scores.is_null() | (items.list.len() == 0) | (scores.list.len() != items.list.len())
    )
    if bad.height:
        raise ValueError(
            f"{bad.height} examples (splits {sorted(bad['split'].unique().to_list())}) lack a "
            "retriever score per candidate; train examples have none (and shuffled lists): "
            "pass val/test/next examples"
        )
    rows = (
        candidates.select(
            pl.col("example_id").cast(pl.Int64),
            pl.col("user_idx").cast(pl.Int32),
            pl.col("split").cast(pl.String),
            pl.col("prefix_len").cast(pl.Int32),
            pl.col("target_item_idx").cast(pl.Int32),
            items.cast(pl.List(pl.Int32)).alias("candidate_item_idx"),
            scores.cast(pl.List(pl.Float64)).alias("retriever_score"),
            pl.int_ranges(items.list.len(), dtype=pl.Int32).alias("position"),
        )
        .explode("candidate_item_idx", "retriever_score", "position")
        .sort("example_id", "position")
    )
    if rows["retriever_score"].null_count() or rows["retriever_score"].is_nan().any():
        raise ValueError("candidates: a retriever score is null or NaN")
    is_target = pl.col("candidate_item_idx") == pl.col("target_item_idx")
    return rows.with_columns(label=is_target.fill_null(False).cast(pl.Int8)).drop("target_item_idx")


def _retriever_features() -> list[pl.Expr]:
    """What the retriever thought, made comparable across examples: raw scores drift from user
    to user, the gap to the top and to the list's mean say how confident it was here."""
    s = pl.col("retriever_score")
    return [
        # rows are in (example, position) order, so "ordinal" gives ties to the earlier
        # candidate; on val/test lists (retriever order) this is position + 1
        (-s).rank("ordinal").over("example_id").cast(pl.Float64).alias("retriever_rank"),
        (s.max().over("example_id") - s).alias("score_margin"),
        (s - s.mean().over("example_id")).alias("score_vs_mean"),
    ]


def _popularity_features(
    rows: pl.DataFrame, sequences: pl.DataFrame, item_popularity: pl.DataFrame
) -> pl.DataFrame:
    """log1p(train interactions) of the candidate, and that minus the mean over the example's
    input history (its user's first `prefix_len` items): the retriever's popularity prior is
    one for everybody, while users differ in how far from the mainstream they go."""
    _require(item_popularity, ["item_idx", "n_train_interactions"], "item_popularity")
    pop = item_popularity.select(
        pl.col("item_idx").cast(pl.Int32),
        pl.col("n_train_interactions").cast(pl.Float64).log1p().alias("log_popularity"),
    )
    if pop["item_idx"].n_unique() != pop.height:
        raise ValueError("item_popularity: item_idx must be unique")
    examples = rows.select("example_id", "user_idx", "prefix_len").unique("example_id")
    history = (
        examples.join(
            sequences.select(pl.col("user_idx", "position", "item_idx").cast(pl.Int32)),
            on="user_idx",
        )
        .filter(pl.col("position") < pl.col("prefix_len"))
        .join(pop, on="item_idx", how="left")
        .group_by("example_id")
        .agg(history_log_popularity=pl.col("log_popularity").mean())
    )
    out = rows.join(
        pop.rename({"item_idx": "candidate_item_idx"}), on="candidate_item_idx", how="left"
    ).join(history, on="example_id", how="left")
    if out["log_popularity"].null_count():
        raise ValueError("item_popularity lacks some candidate items: pass the items table")
    gap = pl.col("log_popularity") - pl.col("history_log_popularity")
    return out.with_columns(
        popularity_gap=gap.fill_null(np.nan),  # NaN (LightGBM's missing) for an empty history
        history_len=pl.col("prefix_len").cast(pl.Float64),
    )


def _path_features(
    rows: pl.DataFrame, pair_features: pl.DataFrame, path_types: Sequence[str] | None
) -> tuple[pl.DataFrame, list[str]]:
    """Per path type the number of KG paths from the history to the candidate (0 where none),
    and their total. Pair rows of other examples or candidates are ignored; duplicates add."""
    _require(pair_features, FEATURE_COLUMNS, "pair_features")
    pf = pair_features.select(
        pl.col("example_id").cast(pl.Int64),
        pl.col("candidate_item_idx").cast(pl.Int32),
        pl.col("path_type").cast(pl.String),
        pl.col("n_paths").cast(pl.Int64),
    ).join(rows.select(KEYS).unique(), on=KEYS, how="semi")
    found = sorted(pf["path_type"].unique().to_list())
    types = found if path_types is None else list(path_types)
    unknown = sorted(set(found) - set(types))
    if unknown:
        raise ValueError(f"pair_features has path types {unknown} outside path_types {types}")
    columns = [f"{PATH_PREFIX}{t}" for t in types]
    kind = pl.col("path_type")
    counts = pf.group_by(KEYS).agg(
        pl.col("n_paths").filter(kind == t).sum().alias(c) for t, c in zip(types, columns)
    )
    out = rows.join(counts, on=KEYS, how="left").with_columns(
        pl.col(columns).fill_null(0).cast(pl.Float64)
    )
    total = pl.sum_horizontal(columns) if columns else pl.lit(0.0)
    return out.with_columns(total.cast(pl.Float64).alias(f"{PATH_PREFIX}total")), columns


def _join_scores(rows: pl.DataFrame, scores: pl.DataFrame, column: str, name: str) -> pl.DataFrame:
    """`scores`' `column` as the feature `name`; every candidate must have exactly one."""
    _require(scores, [*KEYS, column], name)
    scores = scores.select(
        pl.col("example_id").cast(pl.Int64),
        pl.col("candidate_item_idx").cast(pl.Int32),
        pl.col(column).cast(pl.Float64).alias(name),
    )
    if scores.select(KEYS).is_duplicated().any():
        raise ValueError(f"{name}: more than one score for an (example_id, candidate_item_idx)")
    out = rows.join(scores, on=KEYS, how="left")
    if out[name].null_count():
        raise ValueError(
            f"{name}: {out[name].null_count()} of {out.height} candidates have no score; "
            "restrict the candidates to the examples that were scored"
        )
    return out


def feature_table(
    candidates: pl.DataFrame,
    sequences: pl.DataFrame,
    pair_features: pl.DataFrame,
    item_popularity: pl.DataFrame,
    preference_scores: pl.DataFrame | None = None,
    llm_scores: pl.DataFrame | None = None,
    path_types: Sequence[str] | None = None,
) -> pl.DataFrame:
    """One row per (example, candidate) of `candidates` (val/test/next rows of the candidates
    table: lists in retriever order, with the retriever's scores), sorted by example_id and
    position: the ID_COLUMNS (label 1 = the true item) then Float64 features:

    retriever_score, retriever_rank (1-based, ties to the earlier candidate), score_margin
    (top score − score), score_vs_mean (score − the list's mean), log_popularity
    (log1p train interactions), popularity_gap (that − its mean over the input history),
    history_len (prefix_len), paths_<type> for each path type, paths_total, then
    preference_score and llm_score when given.

    `sequences`: the prepare stage's table. `pair_features`: (example_id,
    candidate_item_idx, path_type, n_paths), as `read_pair_features` reads it. `item_popularity`:
    the items table (item_idx, n_train_interactions). `preference_scores`: (example_id,
    candidate_item_idx, score), as `preference_ranking.score_examples` makes it; `llm_scores`:
    the same keys with `llm_score`. `path_types`: the vocabulary of the path columns (default:
    the types present); pass `preference_grid.read_path_types(folder)` so that tables built
    apart (val/test to fit, `next` to serve) have the same columns.
    """
    rows = _candidate_rows(candidates)
    rows = rows.with_columns(_retriever_features())
    rows = _popularity_features(rows, sequences, item_popularity)
    rows, path_columns = _path_features(rows, pair_features, path_types)
    columns = [
        "retriever_score", "retriever_rank", "score_margin", "score_vs_mean",
        "log_popularity", "popularity_gap", "history_len", *path_columns, f"{PATH_PREFIX}total",
    ]  # fmt: skip
    if preference_scores is not None:
        rows = _join_scores(rows, preference_scores, "score", "preference_score")
        columns.append("preference_score")
    if llm_scores is not None:
        rows = _join_scores(rows, llm_scores, "llm_score", "llm_score")
        columns.append("llm_score")
    return rows.select(*ID_COLUMNS, *columns).sort("example_id", "position")


def feature_names(features: pl.DataFrame, exclude: Sequence[str] = ()) -> list[str]:
    """The feature columns of a `feature_table`, in order, less `exclude` (e.g. `llm_score`
    for the `ltr` row when the table serves `ltr+llm` too)."""
    names = [c for c in features.columns if c not in ID_COLUMNS]
    unknown = sorted(set(exclude) - set(names))
    if unknown:
        raise ValueError(f"exclude names {unknown}, which are not features of {names}")
    return [c for c in names if c not in exclude]


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
        assert self.n_folds >= 3, f"n_folds={self.n_folds}: one fold scores, one stops, ≥1 fits"
        assert self.num_leaves >= 2, f"num_leaves={self.num_leaves} must be ≥ 2"
        assert self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0"
        assert self.n_estimators >= 1, f"n_estimators={self.n_estimators} must be ≥ 1"
        assert self.early_stopping_rounds >= 1, "early_stopping_rounds must be ≥ 1"
        assert self.eval_at >= 1, f"eval_at={self.eval_at} must be ≥ 1"

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
    _require(features, [*ID_COLUMNS, *columns, *init], "features")
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
    _require(features, [*result.feature_columns, *init], "features")
    # every tree: the served model was grown to its chosen size
    return _predict(result.booster, features, result.feature_columns, config, trees=-1)


def ranks_from_scores(features: pl.DataFrame, scores: np.ndarray) -> pl.DataFrame:
    """(example_id, rank): the 1-based rank of each example's label-1 row under `scores`
    (aligned with `features`' rows), ties to the lower position (`fusion.target_ranks`' rule).
    Examples without a label-1 row (true item not a candidate, or `next`) are omitted."""
    _require(features, ["example_id", "position", "label"], "features")
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


def llm_scores(ranked: pl.DataFrame) -> pl.DataFrame:
    """(example_id, candidate_item_idx, llm_score) from a rank_llm table (`rankings`, or the
    LLM's ranking of serving prompts): the `llm_scores` input of `feature_table`."""
    return ranked.select(
        "example_id", candidate_item_idx="ranked_item_idxs", llm_score="ranked_scores"
    ).explode("candidate_item_idx", "llm_score")
