"""Rankers side by side: per-user ranks → metrics with bootstrap intervals and paired tests.

Every ranker (the retriever, the preference module, each fine-tuned LLM variant) is reduced to
one table of per-user ranks of the true item, so one set of formulas (`core.evaluate.metrics`)
scores them all. Two populations, as in the LlamaRec papers (DESIGN.md §1):

- subset: users whose true item is among the 20 candidates (the only ones an LLM can rank);
- overall: every user; a true item outside the candidates is a miss (rank inf) for the LLM and
  the preference module, while the retriever keeps its full-ranking rank.

Uncertainty is over users: a percentile bootstrap of the mean, and a paired randomisation
(sign-flip) test of the per-user differences between two rankers on the same users, the test
IR evaluation recommends for paired system comparisons (Smucker et al., CIKM 2007).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

from lkg_pipeline.core.evaluate.metrics import per_user_metrics

POPULATIONS = ("subset", "overall")
RETRIEVER = "retriever"
PREFERENCE = "preference"
REFERENCE_VARIANT = "llamarec"  # the ranker without the knowledge graph
SIGNIFICANCE = 0.05  # a verdict says "beats" only below this paired p-value, on every metric
MAX_K = 20  # the candidates a reranker orders: the cutoffs the rankers can be compared at
PRIOR_SUFFIX = "+prior"  # a variant's scores fused with the retriever's (core.llm.rank.fusion)
# One row per (ranker, split, user): what every comparison starts from.
RANK_COLUMNS = {
    "ranker": pl.String,
    "split": pl.String,
    "user_idx": pl.Int32,
    "in_candidates": pl.Boolean,
    "rank": pl.Float64,  # 1-based; inf = the true item was not ranked
}


@dataclass(frozen=True)
class EvaluationConfig:
    ks: tuple[int, ...] = (1, 5, 10)  # the cutoffs the papers report
    n_bootstrap: int = 1000  # resamples of users for the intervals
    n_permutations: int = 10_000  # sign flips for the paired test (p resolution ~1e-4)
    confidence: float = 0.95
    seed: int = 0  # the resamples and flips; the same seed gives the same report

    def __post_init__(self) -> None:
        if not (self.ks and all(1 <= k <= MAX_K for k in self.ks)):
            raise ValueError(
                f"ks must be in 1..{MAX_K}, got {self.ks}: the rerankers order {MAX_K} candidates, "
                "so beyond them every one but the retriever misses by construction"
            )
        if not ({1, 10} <= set(self.ks)):
            raise ValueError(
                f"ks must include 1 and 10, got {self.ks}: the verdicts and the served-ranker "
                "choice read MRR@1 and NDCG@10"
            )
        if self.n_bootstrap < 10:
            raise ValueError(f"n_bootstrap={self.n_bootstrap} is too few")
        if self.n_permutations < 10:
            raise ValueError(f"n_permutations={self.n_permutations} is too few")
        if not (0 < self.confidence < 1):
            raise ValueError(f"confidence={self.confidence} must be in (0, 1)")

    @property
    def metric_names(self) -> list[str]:
        return [f"{m}@{k}" for m in ("MRR", "NDCG", "Recall") for k in self.ks]


# ----------------------------------------------------------------------------- ranks


def _evaluated(candidates: pl.DataFrame) -> pl.DataFrame:
    rows = candidates.filter(pl.col("split").is_in(["val", "test"]))
    assert rows.height, "candidates has no val/test examples"
    return rows


def retriever_ranks(candidates: pl.DataFrame) -> pl.DataFrame:
    """The retriever's full-ranking rank of each val/test true item (beyond 20 too)."""
    return _evaluated(candidates).select(
        ranker=pl.lit(RETRIEVER),
        split="split",
        user_idx="user_idx",
        in_candidates="in_candidates",
        rank=pl.col("target_rank").cast(pl.Float64),
    )


def example_based_ranks(
    candidates: pl.DataFrame, ranked: pl.DataFrame, ranker: str
) -> pl.DataFrame:
    """Ranks of a ranker over the candidates, from (example_id, rank) rows.

    A split the ranker did not score at all is left out (it was not asked for); a split scored
    for only some of its subset users is an error, because the metrics would silently describe
    other users than the retriever's. Examples outside the subset are misses whether or not
    they were scored.
    """
    evaluated = _evaluated(candidates)
    joined = evaluated.join(
        ranked.select("example_id", scored_rank=pl.col("rank").cast(pl.Float64)),
        on="example_id",
        how="left",
    )
    parts = []
    for split, rows in joined.group_by("split", maintain_order=True):
        if rows["scored_rank"].is_null().all():
            continue
        missing = rows.filter(pl.col("in_candidates") & pl.col("scored_rank").is_null())
        if missing.height:
            raise ValueError(
                f"{ranker}: {missing.height} {split[0]} examples whose true item is a candidate "
                f"were not ranked (e.g. example_id {missing['example_id'].head(3).to_list()}); "
                "re-materialise its rankings"
            )
        parts.append(rows)
    if not parts:
        raise ValueError(f"{ranker}: no val/test example was ranked")
    return pl.concat(parts).select(
        ranker=pl.lit(ranker),
        split="split",
        user_idx="user_idx",
        in_candidates="in_candidates",
        rank=pl.when("in_candidates").then("scored_rank").otherwise(math.inf),
    )


def llm_ranks(candidates: pl.DataFrame, rankings: pl.DataFrame, variant: str) -> pl.DataFrame:
    """A fine-tuned variant's ranks, from its `rankings` table."""
    ranked = rankings.select("example_id", rank=pl.col("target_rank").fill_null(math.inf))
    return example_based_ranks(candidates, ranked, variant)


# ----------------------------------------------------------------------------- statistics


def bootstrap_intervals(
    values: np.ndarray, n_resamples: int, confidence: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over users, for each column of (U, M) values.

    Resamples are drawn a block at a time (~4M picks, 32 MB): all B × U picks at once took
    350 MB at 22k users and would take 16 GB at 1M. The stream is drawn in the same order,
    so the intervals are those of one draw."""
    u = values.shape[0]
    rows = max(1, (1 << 22) // max(u, 1))
    means = np.empty((n_resamples, values.shape[1]))  # (B, M)
    for start in range(0, n_resamples, rows):
        block = min(rows, n_resamples - start)
        picks = rng.integers(0, u, size=(block, u))  # (r, U)
        # each resample's counts of every user @ values: its mean, without an (r, U, M) tensor
        counts = np.zeros((block, u))
        np.add.at(counts, (np.repeat(np.arange(block), u), picks.reshape(-1)), 1.0)
        means[start : start + block] = counts @ values / u
    tail = (1 - confidence) / 2 * 100
    return np.percentile(means, tail, axis=0), np.percentile(means, 100 - tail, axis=0)


def paired_randomization_test(
    a: np.ndarray, b: np.ndarray, n_permutations: int, rng: np.random.Generator
) -> np.ndarray:
    """Two-sided p-value per column that rankers a and b (U, M), on the same users, differ.

    Under the null each user's difference is as likely to have either sign, so flipping signs
    at random gives the null distribution of the mean difference. The +1s make p > 0 (the
    observed assignment is one of the permutations).
    """
    assert a.shape == b.shape, f"paired values differ in shape: {a.shape} vs {b.shape}"
    d = a - b  # (U, M)
    observed = np.abs(d.mean(axis=0))  # (M,)
    users = d.shape[0]
    # Flips drawn a block of rows at a time (~16M signs, 128 MB): one (R, U) matrix was 1.8 GB
    # at 22k users. An even number of draws per block keeps numpy's stream (it draws these in
    # pairs), so the p-values are those of one matrix.
    rows = max(2, (1 << 24) // max(users, 1)) // 2 * 2
    exceed = np.zeros(d.shape[1], dtype=np.int64)
    for start in range(0, n_permutations, rows):
        block = min(rows, n_permutations - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(block, users))  # (r, U)
        null = np.abs(signs @ d / users)  # (r, M)
        exceed += (null >= observed[None, :] - 1e-12).sum(axis=0)
    return (exceed + 1) / (n_permutations + 1)


# ----------------------------------------------------------------------------- report


@dataclass
class Evaluation:
    metrics: pl.DataFrame  # ranker, split, population, metric, value, ci_low, ci_high, n_users
    comparisons: pl.DataFrame  # ranker, baseline, split, population, metric, … , p_value
    populations: pl.DataFrame  # split, population, n_users
    verdicts: list[str]
    config: EvaluationConfig


def _matrix(rows: pl.DataFrame, config: EvaluationConfig) -> np.ndarray:
    per_user = per_user_metrics(rows["rank"].to_numpy(), config.ks)
    return np.stack([per_user[m] for m in config.metric_names], axis=1)  # (U, M)


def _population(rows: pl.DataFrame, population: str) -> pl.DataFrame:
    return rows.filter(pl.col("in_candidates")) if population == "subset" else rows


def random_stream(seed: int, *about: str) -> np.random.Generator:
    """The random draws of one interval or test, named by what it is about (split,
    population, ranker, baseline): one stream shared in turn by every ranker made a ranker's
    interval and p-value move when another ranker was added to or left out of the report."""
    name = hashlib.sha256("\x1f".join(about).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(name[:8], "little")])


def evaluate(ranks: pl.DataFrame, config: EvaluationConfig = EvaluationConfig()) -> Evaluation:
    """Metrics with intervals for every ranker, and each ranker against the baselines.

    Baselines: the retriever for every other ranker, and `llamarec` for the KG variants. The
    same users are compared (a paired test), so a difference is never an artefact of a
    different population.
    """
    ranks = ranks.select([pl.col(c).cast(t) for c, t in RANK_COLUMNS.items()])
    dupes = ranks.group_by("ranker", "split", "user_idx").len().filter(pl.col("len") > 1)
    assert dupes.height == 0, f"several ranks for one user: {dupes.head(3).to_dicts()}"
    names = config.metric_names
    rankers = list(dict.fromkeys(ranks["ranker"].to_list()))
    metric_rows, compare_rows, population_rows = [], [], []
    for split in ("val", "test"):
        of_split = ranks.filter(pl.col("split") == split)
        if of_split.height == 0:
            continue
        for population in POPULATIONS:
            chosen = _population(of_split, population)
            population_rows.append(
                {"split": split, "population": population, "n_users": chosen["user_idx"].n_unique()}
            )
            groups = chosen.sort("user_idx").partition_by("ranker", as_dict=True)
            by_ranker = {r: groups[(r,)] for r in rankers if (r,) in groups}
            for ranker, rows in by_ranker.items():
                values = _matrix(rows, config)
                rng = random_stream(config.seed, split, population, ranker)
                low, high = bootstrap_intervals(values, config.n_bootstrap, config.confidence, rng)
                for j, name in enumerate(names):
                    metric_rows.append(
                        {
                            "ranker": ranker,
                            "split": split,
                            "population": population,
                            "metric": name,
                            "value": float(values[:, j].mean()),
                            "ci_low": float(low[j]),
                            "ci_high": float(high[j]),
                            "n_users": rows.height,
                        }
                    )
            for ranker, rows in by_ranker.items():
                for baseline in _baselines(ranker):
                    if baseline not in by_ranker:
                        continue
                    both = rows.join(by_ranker[baseline], on="user_idx", suffix="_base")
                    a = _matrix(both, config)
                    b = _matrix(both.select("user_idx", rank="rank_base"), config)
                    rng = random_stream(config.seed, split, population, ranker, baseline)
                    p = paired_randomization_test(a, b, config.n_permutations, rng)
                    for j, name in enumerate(names):
                        mine, theirs = float(a[:, j].mean()), float(b[:, j].mean())
                        compare_rows.append(
                            {
                                "ranker": ranker,
                                "baseline": baseline,
                                "split": split,
                                "population": population,
                                "metric": name,
                                "value": mine,
                                "baseline_value": theirs,
                                "difference": mine - theirs,
                                "relative": (mine - theirs) / theirs if theirs > 0 else math.nan,
                                "p_value": float(p[j]),
                                "n_users": both.height,
                            }
                        )
    comparisons = pl.DataFrame(
        compare_rows,
        schema={
            "ranker": pl.String,
            "baseline": pl.String,
            "split": pl.String,
            "population": pl.String,
            "metric": pl.String,
            "value": pl.Float64,
            "baseline_value": pl.Float64,
            "difference": pl.Float64,
            "relative": pl.Float64,
            "p_value": pl.Float64,
            "n_users": pl.Int64,
        },
    )
    return Evaluation(
        metrics=pl.DataFrame(metric_rows),
        comparisons=comparisons,
        populations=pl.DataFrame(population_rows),
        verdicts=verdicts(comparisons),
        config=config,
    )


def _baselines(ranker: str) -> list[str]:
    """The retriever for every ranker; the same rule without the KG (`llamarec`, or
    `llamarec+prior` for a fused variant) for the KG variants; a fused variant also against
    its own unfused scores."""
    if ranker == RETRIEVER:
        return []
    if ranker in (REFERENCE_VARIANT, PREFERENCE, REFERENCE_VARIANT + PRIOR_SUFFIX):
        baselines = [RETRIEVER]
    elif ranker.endswith(PRIOR_SUFFIX):
        baselines = [REFERENCE_VARIANT + PRIOR_SUFFIX, RETRIEVER]
    else:
        baselines = [REFERENCE_VARIANT, RETRIEVER]
    if ranker.endswith(PRIOR_SUFFIX):
        baselines.append(ranker.removesuffix(PRIOR_SUFFIX))
    return baselines


def verdicts(
    comparisons: pl.DataFrame,
    split: str = "test",
    population: str = "overall",
    metrics: tuple[str, ...] = ("MRR@1", "NDCG@10"),
) -> list[str]:
    """One line per comparison that says plainly who won, e.g. "lkg_rag does NOT significantly
    beat llamarec (test, overall, 943 users): MRR@1 +12.3% (p = 0.041), NDCG@10 +4.0% (p =
    0.21)": BEATS only when every metric is better at p < SIGNIFICANCE."""
    chosen = comparisons.filter(
        (pl.col("split") == split)
        & (pl.col("population") == population)
        & pl.col("metric").is_in(list(metrics))
    )
    lines = []
    for (ranker, baseline), rows in chosen.group_by("ranker", "baseline", maintain_order=True):
        parts = []
        for name in metrics:
            row = rows.filter(pl.col("metric") == name).row(0, named=True)
            change = (
                f"{row['relative'] * 100:+.1f}%"
                if not math.isnan(row["relative"])
                else f"{row['difference']:+.4f}"
            )
            parts.append(f"{name} {change} (p = {row['p_value']:.3g})")
        n = rows["n_users"][0]
        better = rows.filter((pl.col("difference") > 0) & (pl.col("p_value") < SIGNIFICANCE))
        worse = rows.filter((pl.col("difference") < 0) & (pl.col("p_value") < SIGNIFICANCE))
        if better.height == len(metrics):
            word = "BEATS"
        elif worse.height:
            word = "is WORSE than" if better.height == 0 else "is MIXED against"
        else:
            word = "does NOT significantly beat"
        head = f"{ranker} {word} {baseline} ({split}, {population}, {n} users): "
        lines.append(head + ", ".join(parts))
    return lines


def report_dict(evaluation: Evaluation, extra: dict[str, Any]) -> dict[str, Any]:
    """The report as plain JSON-ready data; `extra` adds dataset, latency, provenance."""
    return {
        **extra,
        "config": asdict(evaluation.config),
        "populations": evaluation.populations.to_dicts(),
        "metrics": evaluation.metrics.to_dicts(),
        "comparisons": evaluation.comparisons.to_dicts(),
        "verdicts": evaluation.verdicts,
    }


def dumps(report: dict[str, Any]) -> str:
    """JSON with NaN written as null (strict JSON readers reject NaN)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(report), indent=2)


def metrics_wide(evaluation: Evaluation, split: str, population: str) -> pl.DataFrame:
    """One row per ranker, one column per metric, cells "0.1234 [0.1000, 0.1500]"."""
    rows = evaluation.metrics.filter(
        (pl.col("split") == split) & (pl.col("population") == population)
    )
    cells = rows.select(
        "ranker",
        "metric",
        "n_users",
        cell=pl.format(
            "{} [{}, {}]",
            pl.col("value").round(4),
            pl.col("ci_low").round(4),
            pl.col("ci_high").round(4),
        ),
    )
    order = list(dict.fromkeys(rows["ranker"].to_list()))
    wide = cells.pivot("metric", index=["ranker", "n_users"], values="cell")
    return wide.sort(pl.col("ranker").replace_strict({r: i for i, r in enumerate(order)}))


def report_markdown(
    report: dict[str, Any], evaluation: Evaluation, head: Sequence[str] = ()
) -> str:
    """The report for people: `head` (what is served), verdicts, then one table per split and
    population."""
    from lkg_pipeline.core.io.tables import markdown_table

    lines = [f"# Evaluation: {report.get('dataset', '')}", "", *head]
    if report.get("variants_missing"):  # said, never skipped silently
        lines += [f"Not ranked (not in this report): {', '.join(report['variants_missing'])}.", ""]
    lines += [f"- {v}" for v in evaluation.verdicts] or ["- (no comparison)"]
    level = int(evaluation.config.confidence * 100)
    for population in evaluation.populations.iter_rows(named=True):
        split, name = population["split"], population["population"]
        lines += [
            "",
            f"## {split}, {name} ({population['n_users']} users; {level}% bootstrap intervals)",
            "",
            markdown_table(metrics_wide(evaluation, split, name)),
        ]
        if split == "val" and report.get("fusion"):
            lines += [
                "",
                "`+prior` rows: λ chosen on these users (in-sample); `ltr` rows: cross-fitted.",
            ]
    if report.get("fusion"):
        lines += ["", "## Retriever prior (λ chosen on validation)", ""]
        lines += [f"- {f['ranker']}: {f['choice']}" for f in report["fusion"]]
    if report.get("latency"):
        lines += ["", "## Latency per user (seconds per prompt)", ""]
        lines += [markdown_table(pl.DataFrame(report["latency"]))]
    return "\n".join(lines) + "\n"
