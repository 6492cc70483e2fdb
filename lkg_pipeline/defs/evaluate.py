"""Group `evaluate`: LLM rankings, the side-by-side evaluation report, recommendations."""

import functools
import json
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import dagster as dg
import matplotlib
import numpy as np
import polars as pl

from lkg_pipeline.core.data.sources import sha256_of
from lkg_pipeline.core.evaluate.compare import (
    PREFERENCE,
    RETRIEVER,
    SIGNIFICANCE,
    Evaluation,
    EvaluationConfig,
    dumps,
    evaluate,
    example_based_ranks,
    report_dict,
    report_markdown,
    retriever_ranks,
)
from lkg_pipeline.core.evaluate.ltr import load_ltr, save_ltr
from lkg_pipeline.core.evaluate.ltr_features import read_pair_features
from lkg_pipeline.core.evaluate.rankers import (
    MIN_LTR_EXAMPLES,
    LtrRanker,
    choice_ranks,
    learnable_val_examples,
    llm_rankers,
    ltr_order,
    ltr_rankers,
    rankings_by_variant,
)
from lkg_pipeline.core.evaluate.recommend import (
    RecommendConfig,
    explanation_texts,
    full_histories,
    next_item_examples,
    prompts_as_trained,
    recommendation_table,
)
from lkg_pipeline.core.evaluate.serving import (
    LTR,
    LTR_LLM,
    choose_served,
    fused_order,
    retriever_order,
    served_lines,
    served_summary,
    serving_plan,
)
from lkg_pipeline.core.io.fingerprints import folder_digest
from lkg_pipeline.core.io.storage import replace_dir_atomically
from lkg_pipeline.core.kg.warehouse import read_parquet, write_tables
from lkg_pipeline.core.llm.prompts import (
    SETTINGS_KEY,
    VARIANTS,
    PromptSettings,
    recorded_settings,
)
from lkg_pipeline.core.llm.rank.job import (
    RankJob,
    prompts_to_rank,
    resolve_auto_paths,
    script_args,
    split_summary,
)
from lkg_pipeline.core.paths.enumeration import enumerate_paths
from lkg_pipeline.core.paths.preference.grid import read_path_types
from lkg_pipeline.core.paths.preference.model import load_preference
from lkg_pipeline.core.paths.preference.ranking import preference_ranks, preference_scores
from lkg_pipeline.core.retrieval.seqrec import load_retriever
from lkg_pipeline.defs.layout import (
    adapter_dir,
    current_base_model,
    kg_folder,
    paths_folder,
    preference_dir,
    prompts_file,
    rankings_file,
    recommendations_file,
    reports_dir,
    retriever_dir,
    scratch_dir,
    warehouse_path,
)
from lkg_pipeline.defs.llm import BY_DATASET, AccelerateLaunch, dataset_variant_partitions
from lkg_pipeline.defs.metadata import markdown_table, png_markdown
from lkg_pipeline.defs.partitions import dataset_partitions
from lkg_pipeline.defs.paths import read_path_config
from lkg_pipeline.defs.resources import TORCH_POOL, DataLake
from lkg_pipeline.defs.reuse import Made, Recomputable, reuse_or_run, versioned

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def after_update_of(asset: str) -> dg.AutomationCondition:
    """`eager()` that reacts to updates of `asset` only.

    The report and the recommendations are partitioned by dataset and also read dataset
    stages (candidates, the preference model) directly. Plain `eager()` would start them as
    soon as a retrained preference model lands, beside the adapter training and on last week's
    rankings, and again afterwards; this waits for the new rankings (or adapter).
    """
    updated = dg.AutomationCondition.any_deps_updated().allow(dg.AssetSelection.assets(asset))
    return dg.AutomationCondition.eager().replace("any_deps_updated", updated)


def launch_ranking(
    context: dg.AssetExecutionContext,
    pipes: dg.PipesSubprocessClient,
    lake: Path,
    config: "RankingRunConfig | RecommendationRunConfig",
    prompts: pl.DataFrame,
    adapter: Path | None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """`prompts` ranked by `core.llm.rank.job` under `accelerate launch` (its processes share
    the prompts; progress streams into this run's log through Pipes), and how it ran."""
    dtype, attention, chosen = config.dtype, config.attention, {}
    if config.launch_file() is None:  # one CPU process: `auto` is measured here, once
        dtype, attention, chosen = resolve_auto_paths(current_base_model(lake), dtype, attention)
    scratch = scratch_dir(lake)
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="rank-") as folder:
        given, output = Path(folder) / "prompts.parquet", Path(folder) / "rankings.parquet"
        prompts.write_parquet(given)
        job = RankJob(
            prompts=given,
            base_model=current_base_model(lake),
            adapter=adapter,
            output=output,
            batch_size=config.batch_size,
            dtype=dtype,
            what=f"{context.asset_key.to_user_string()} {context.partition_key}",
            attention=attention,
        )
        command = [*config.launcher(), "-m", "lkg_pipeline.core.llm.rank", *script_args(job)]
        context.log.info(" ".join(command))
        reported = pipes.run(command=command, context=context)
        metadata = dict(reported.get_materialize_result().metadata or {})
        return pl.read_parquet(output), {**metadata, **chosen}


def _adapter(lake: Path, dataset: str, variant: str, use_adapter: bool) -> Path | None:
    """The variant's adapter folder (None: rank with the base model), or a clear error."""
    if not use_adapter:
        return None
    adapter = adapter_dir(lake, dataset, variant)
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{adapter} holds no adapter: materialise lora_adapter for {dataset}|{variant} "
            "first, or set use_adapter: false to rank with the base model"
        )
    return adapter


def _training_record(adapter: Path | None) -> dict:
    """The adapter's training.json; empty without an adapter or a record."""
    record = adapter / "training.json" if adapter is not None else None
    return json.loads(record.read_text()) if record is not None and record.exists() else {}


def _check_base_model(adapter: Path | None, base: Path) -> None:
    """An adapter on a base model other than its own ranks with meaningless scores (or fails
    deep in peft when the shapes differ): refused, naming what to materialise. Adapters whose
    training.json predates the record are not checked."""
    trained = _training_record(adapter)
    recorded = trained.get("base_model_sha256")
    if recorded is not None and recorded != folder_digest(base):
        raise ValueError(
            f"{adapter} was trained on the base model {trained.get('base_model')} as it was "
            f"then; the current base_model ({base}) is another: materialise lora_adapter "
            "again (or base_model with the source the adapter was trained on)"
        )


def _trained_on_these_prompts(adapter: Path | None, prompts: Path) -> bool | None:
    """Whether `adapter` was trained on the prompts file as it is now (its training.json
    records the file's sha256); None without an adapter or a record."""
    trained = _training_record(adapter).get("prompts_sha256")
    if trained is None or not prompts.exists():
        return None
    return trained == sha256_of(prompts)


def _previous_table(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.exists() else None


class RankingRunConfig(Recomputable, AccelerateLaunch):
    # The report's verdicts are on test; val (~250 prompts more, 2-4 minutes on 2 CPU cores)
    # is where the report chooses the retriever-fusion weight of the `<variant>+prior` row.
    splits: list[str] = ["val", "test"]
    # subset: only prompts whose true item is a candidate (the others are misses whatever the
    # LLM does, so scoring them changes no metric); all: every val/test prompt.
    scope: Literal["subset", "all"] = "subset"
    batch_size: int | None = None  # prompts per forward (by length); None: 1 on CPU, 16 on GPU
    use_adapter: bool = True  # False: rank with the base model (zero-shot)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # core.llm.precision: bf16 if faster
    # the path of the segment windows: auto times both at start-up (core.llm.segments)
    attention: Literal["auto", "kernel", "matmul"] = "auto"


@dg.asset(
    automation_condition=dg.AutomationCondition.eager(),  # see sensors.py
    group_name="evaluate",
    pool=TORCH_POOL,  # one such step at a time (dagster.yaml)
    partitions_def=dataset_variant_partitions,
    code_version=versioned("1", __name__),
    kinds={"pytorch", "parquet"},
    deps=["base_model", "lora_adapter"],
    ins={"prompts": dg.AssetIn()},
)
def rankings(
    context: dg.AssetExecutionContext,
    config: RankingRunConfig,
    lake: DataLake,
    pipes_subprocess_client: dg.PipesSubprocessClient,
    prompts: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """The fine-tuned LLM's ranking of each val/test prompt's 20 candidates (one forward each)."""
    keys = context.partition_key.keys_by_dimension
    dataset, variant = keys["dataset"], keys["variant"]
    chosen = prompts_to_rank(prompts, config.splits, config.scope, f"{dataset}|{variant}")

    def rank() -> Made:
        adapter = _adapter(lake.path, dataset, variant, config.use_adapter)
        _check_base_model(adapter, current_base_model(lake.path))
        trained_on_these = _trained_on_these_prompts(
            adapter, prompts_file(lake.path, dataset, variant)
        )
        if trained_on_these is False:
            context.log.warning(
                f"the adapter of {dataset}|{variant} was trained on other prompts than the "
                "stored ones (`prompts` was made again since): its scores are for another "
                "prompt; materialise lora_adapter again"
            )
        context.log.info(f"ranking {chosen.height} prompts of {dataset}|{variant}")
        # an adapter trained over the retriever ranks by retriever prior + LLM (core.llm.rank)
        table, launched = launch_ranking(
            context, pipes_subprocess_client, lake.path, config, chosen, adapter
        )
        metadata = {
            "adapter": str(adapter) if adapter else "none (base model)",
            "adapter_trained_on_these_prompts": str(trained_on_these),
            "scope": config.scope,
            **launched,  # scores, device, processes, prompts, seconds, rates, dtype
            "ranked_prompt_metrics": dg.MetadataValue.md(markdown_table(split_summary(table))),
        }
        return Made({"rankings": table}, metadata)

    inputs = {
        "prompts": chosen,
        "base_model": current_base_model(lake.path),
        "adapter": adapter_dir(lake.path, dataset, variant) if config.use_adapter else None,
        "accelerate_config": config.launch_file(),
    }
    kept = {"rankings": _previous_table(rankings_file(lake.path, dataset, variant))}
    return reuse_or_run(context, lake.path, config, inputs, kept, rank, returns="rankings")


class EvaluationRunConfig(dg.Config):
    NOT_EXPOSED: ClassVar[dict[str, str]] = {}

    n_bootstrap: int = EvaluationConfig.n_bootstrap
    n_permutations: int = EvaluationConfig.n_permutations
    confidence: float = EvaluationConfig.confidence
    seed: int = EvaluationConfig.seed
    ks: list[int] = list(EvaluationConfig.ks)
    include_preference: bool = True  # the preference module's own ranking of the candidates
    # The learned reranker over explicit features (core.evaluate.ltr): `ltr`, and `ltr+llm` with the
    # LLM's score as one more feature when a variant was ranked. A few seconds on ml-100k.
    include_ltr: bool = True

    def to_core(self) -> EvaluationConfig:
        return EvaluationConfig(
            n_bootstrap=self.n_bootstrap,
            n_permutations=self.n_permutations,
            confidence=self.confidence,
            seed=self.seed,
            ks=tuple(self.ks),
        )


@dg.asset(
    automation_condition=after_update_of("rankings"),  # see sensors.py
    group_name="evaluate",
    partitions_def=dataset_partitions,
    code_version=versioned("1", __name__),
    kinds={"polars", "json"},
    deps=["preference_model", "kg_paths"],
    ins={
        "candidates": dg.AssetIn(),
        "sequences": dg.AssetIn(),  # the learned reranker's history features
        "items": dg.AssetIn(),  # and its popularity feature
        # every variant's rankings of the dataset, keyed by partition; a variant not ranked
        # yet is left out and named in the report (log, Markdown, metadata), not an error
        "rankings": dg.AssetIn(
            partition_mapping=BY_DATASET, metadata={"allow_missing_partitions": True}
        ),
    },
    check_specs=[
        dg.AssetCheckSpec(
            "fine_tuned_beats_retriever",
            asset="evaluation_report",
            description="Warns when a fine-tuned variant does not beat the retriever on test "
            "overall NDCG@10.",
        ),
        dg.AssetCheckSpec(
            "served_holds_on_test",
            asset="evaluation_report",
            description="Warns when the ranker chosen on validation is significantly worse "
            "than the retriever on test overall NDCG@10.",
        ),
    ],
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationRunConfig,
    lake: DataLake,
    candidates: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
    rankings: dict[str, pl.DataFrame],
):
    """Every ranked variant, the retriever, the preference module and the learned reranker,
    side by side, and the ranker to serve."""
    dataset = context.partition_key
    by_variant = rankings_by_variant(rankings)
    llm = llm_rankers(candidates, by_variant, seed=config.seed)
    missing = _check_variants(context, lake.path, dataset, llm.variants)
    for note in llm.notes:
        context.log.info(note)
    ranks = [retriever_ranks(candidates), *llm.ranks]
    if config.include_preference:
        ranks.append(_preference_ranks(lake.path, dataset, candidates))
    ltr = (
        _ltr_rankers(context, lake.path, dataset, candidates, sequences, items, by_variant)
        if config.include_ltr
        else []
    )
    ranks += [example_based_ranks(candidates, r.ranks, r.name) for r in ltr]
    evaluation = evaluate(pl.concat(ranks), config.to_core())
    choice = choose_served(
        choice_ranks(ranks, llm), n_permutations=config.n_permutations, seed=config.seed
    )
    served = served_summary(choice, evaluation.comparisons)
    context.log.info(f"served ranker: {served['served']}: {served['reason']}")
    report = report_dict(
        evaluation,
        {
            "dataset": dataset,
            "served": served,
            "variants": llm.variants,
            "variants_missing": missing,
            "latency": llm.latency,
            "fusion": llm.fusion,
            "ltr": [{"ranker": r.name, **r.summary} for r in ltr],
            "base_model": str(current_base_model(lake.path)),
            "code_version": context.assets_def.code_versions_by_key[context.asset_key],
        },
    )
    markdown = report_markdown(report, evaluation, head=served_lines(served))
    target = reports_dir(lake.path, dataset)
    chart = _write_report(target, report, markdown, evaluation.metrics, ltr, dataset)
    for line in evaluation.verdicts:
        context.log.info(line)
    yield dg.MaterializeResult(
        metadata=_report_metadata(target, served, evaluation, markdown, chart, report)
    )
    yield _beats_retriever(evaluation.metrics, llm.variants)
    yield _served_holds(served)


def _check_variants(
    context: dg.AssetExecutionContext, lake: Path, dataset: str, variants: list[str]
) -> list[str]:
    """The variants not ranked yet (said in the log, the report and the metadata, never
    skipped silently), or an error when none was."""
    if not variants:
        raise FileNotFoundError(
            f"no rankings for {dataset} (partitions {dataset}|<variant> of `rankings`, under "
            f"{rankings_file(lake, dataset, '*').parent}): materialise `rankings` for at "
            "least one variant first"
        )
    missing = [v for v in VARIANTS if v not in variants]
    if missing:
        context.log.warning(
            f"{dataset}: no rankings for {', '.join(missing)}; the report covers "
            f"{', '.join(variants)} (materialise `rankings` for {dataset}|<variant> to add them)"
        )
    return missing


def _write_report(
    target: Path,
    report: dict[str, Any],
    markdown: str,
    metrics: pl.DataFrame,
    ltr: list[LtrRanker],
    dataset: str,
) -> str:
    """The report folder, all or nothing (JSON, Markdown, chart, the fitted rerankers that
    `recommendations` serves); returns the chart as Markdown for the UI."""
    figure = _bar_chart(metrics, dataset)

    def write(folder: Path) -> None:
        (folder / "evaluation.json").write_text(dumps(report))
        for ranker in ltr:
            save_ltr(ranker.model, folder / ranker.name)
        (folder / "evaluation.md").write_text(markdown)
        figure.savefig(folder / "evaluation.png", dpi=100, bbox_inches="tight")

    replace_dir_atomically(target, write)
    chart = png_markdown(figure, "test metrics with 95% intervals")
    plt.close(figure)
    return chart


def _report_metadata(
    target: Path,
    served: dict[str, Any],
    evaluation: Evaluation,
    markdown: str,
    chart: str,
    report: dict[str, Any],
) -> dict[str, Any]:
    return {
        "report": dg.MetadataValue.path(str(target / "evaluation.md")),
        "json": dg.MetadataValue.path(str(target / "evaluation.json")),
        "served_ranker": served["served"],
        "served_because": served["reason"],
        "runner_up": str(served["runner_up"]),
        "verdict": "\n".join(evaluation.verdicts),
        "tables": dg.MetadataValue.md(markdown),
        "chart": dg.MetadataValue.md(chart),
        "populations": dg.MetadataValue.md(markdown_table(evaluation.populations)),
        "variants": dg.MetadataValue.json(report["variants"]),
        "variants_missing": dg.MetadataValue.json(report["variants_missing"]),
        **{
            f"{row['ranker']}_importances": dg.MetadataValue.md(
                markdown_table(pl.DataFrame(row["importances"]).head(12))
            )
            for row in report["ltr"]
        },
    }


def _preference_ranks(lake: Path, dataset: str, candidates: pl.DataFrame) -> pl.DataFrame:
    """The preference module's ranking of the val/test candidates, recomputed from its weights
    a batch of users at a time (`preference_ranks`)."""
    model = load_preference(preference_dir(lake, dataset))
    folder = paths_folder(lake, dataset)
    ranked = preference_ranks(model, candidates, folder, splits=("val", "test"))
    return example_based_ranks(candidates, ranked, PREFERENCE)


def _ltr_rankers(
    context: dg.AssetExecutionContext,
    lake: Path,
    dataset: str,
    candidates: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
    by_variant: dict[str, pl.DataFrame],
) -> list[LtrRanker]:
    """The learned rerankers over the dataset's path features and preference scores; none
    (said in the log) where too few val examples can be learned from."""
    learnable = learnable_val_examples(candidates)
    if learnable < MIN_LTR_EXAMPLES:
        context.log.warning(
            f"{dataset}: ltr skipped: {learnable} validation examples have their true item among "
            f"the candidates, fewer than the {MIN_LTR_EXAMPLES} it needs to fit and cross-fit"
        )
        return []
    evaluated = candidates.filter(pl.col("split").is_in(["val", "test"]))
    folder = paths_folder(lake, dataset)
    pairs = read_pair_features(folder, evaluated["example_id"])
    preference = _preference_scores(lake, dataset, evaluated, pairs)
    path_types = read_path_types(folder)
    return ltr_rankers(
        evaluated, sequences, items, pairs, preference, path_types, by_variant, context.log.warning
    )


def _served_holds(served: dict[str, Any]) -> dg.AssetCheckResult:
    """The validation choice seen on test: a served ranker worse than the retriever at p <
    0.05 there fails (WARN); the retriever itself, or a tie, passes."""
    test = served.get("test", {})
    worse = "p_value" in test and test["difference"] < 0 and test["p_value"] < SIGNIFICANCE
    shown = (
        f"test overall NDCG@10 {test['value']:.4f} vs retriever {test['baseline_value']:.4f} "
        f"(paired p = {test['p_value']:.3g})"
        if "p_value" in test
        else test.get("note", "no test row")
    )
    return dg.AssetCheckResult(
        check_name="served_holds_on_test",
        passed=not worse,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"served {served['served']}: {shown}",
    )


def _beats_retriever(metrics: pl.DataFrame, variants: list[str]) -> dg.AssetCheckResult:
    overall = metrics.filter(
        (pl.col("split") == "test")
        & (pl.col("population") == "overall")
        & (pl.col("metric") == "NDCG@10")
    )
    value = dict(overall.select("ranker", "value").iter_rows())
    if RETRIEVER not in value or not any(v in value for v in variants):
        return dg.AssetCheckResult(
            check_name="fine_tuned_beats_retriever",
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description="no test split was ranked: nothing to compare with the retriever",
        )
    behind = [v for v in variants if v in value and value[v] <= value[RETRIEVER]]
    shown = ", ".join(f"{r} {value[r]:.4f}" for r in [RETRIEVER, *variants] if r in value)
    return dg.AssetCheckResult(
        check_name="fine_tuned_beats_retriever",
        passed=not behind,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"not better than the retriever on test overall NDCG@10: {', '.join(behind)} ({shown})"
            if behind
            else f"every variant beats the retriever on test overall NDCG@10 ({shown})"
        ),
        metadata={f"NDCG@10_{r}": float(v) for r, v in value.items()},
    )


def _bar_chart(metrics: pl.DataFrame, dataset: str) -> "matplotlib.figure.Figure":  # noqa: F821
    """Test metrics per ranker with their intervals, one panel per population."""
    names = ["MRR@1", "NDCG@5", "NDCG@10", "Recall@10"]
    test = metrics.filter((pl.col("split") == "test") & pl.col("metric").is_in(names))
    populations = [p for p in ("subset", "overall") if p in set(test["population"])]
    fig, axes = plt.subplots(1, max(1, len(populations)), figsize=(6 * len(populations), 3.5))
    axes = np.atleast_1d(axes)
    rankers = list(dict.fromkeys(test["ranker"].to_list()))
    width = 0.8 / max(1, len(rankers))
    for ax, population in zip(axes, populations):
        rows = test.filter(pl.col("population") == population)
        for i, ranker in enumerate(rankers):
            mine = {r["metric"]: r for r in rows.filter(pl.col("ranker") == ranker).to_dicts()}
            values = np.array([mine[n]["value"] if n in mine else np.nan for n in names])
            low = np.array([mine[n]["ci_low"] if n in mine else np.nan for n in names])
            high = np.array([mine[n]["ci_high"] if n in mine else np.nan for n in names])
            x = np.arange(len(names)) + (i - (len(rankers) - 1) / 2) * width
            ax.bar(x, values, width, label=ranker, yerr=[values - low, high - values], capsize=2)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_title(f"{dataset}: test, {population}")
    axes[0].legend(fontsize=7)
    return fig


class RecommendationRunConfig(Recomputable, AccelerateLaunch):
    NOT_EXPOSED: ClassVar[dict[str, str]] = {
        "n_candidates": "20: the candidates per prompt the adapter was trained to rank",
    }

    # The ranker to serve, by name (retriever, a variant, <variant>+prior); None: the one the
    # evaluation report chose on validation (`core.evaluate.serving`).
    ranker: str | None = None
    # Whose KG paths explain each item when the served ranker reads no prompt (the retriever);
    # an LLM ranker explains with the paths of its own prompts.
    variant: str = "lkg_rag"
    top_n: int = RecommendConfig.top_n
    max_users: int | None = RecommendConfig.max_users  # the first N users; None: every user
    batch_size: int | None = None  # as in rankings
    use_adapter: bool = True
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # as in rankings
    attention: Literal["auto", "kernel", "matmul"] = "auto"  # as in rankings


@dg.asset(
    automation_condition=after_update_of("evaluation_report"),  # see sensors.py
    group_name="evaluate",
    pool=TORCH_POOL,  # one such step at a time (dagster.yaml)
    partitions_def=dataset_partitions,
    code_version=versioned("3", __name__),
    kinds={"duckdb", "parquet"},
    deps=[
        "retriever",
        "kg_triples",
        "preference_model",
        "base_model",
        dg.AssetDep("lora_adapter", partition_mapping=BY_DATASET),
        "evaluation_report",  # names the ranker to serve
    ],
    ins={"sequences": dg.AssetIn(), "items": dg.AssetIn()},
)
def recommendations(
    context: dg.AssetExecutionContext,
    config: RecommendationRunConfig,
    lake: DataLake,
    pipes_subprocess_client: dg.PipesSubprocessClient,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Top-N next items per user from their full history, ranked by the served ranker, each
    with the KG paths that explain it."""
    dataset = context.partition_key
    report_file = reports_dir(lake.path, dataset) / "evaluation.json"
    plan = serving_plan(report_file, dataset, config.ranker)
    llm = plan["variant"]  # None: the retriever's order, no LLM forward
    variant = llm or config.variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    inputs = {
        "sequences": sequences,
        "items": items,
        "retriever": retriever_dir(lake.path, dataset),
        "kg": kg_folder(lake.path, dataset) if variant != "llamarec" else None,
        "preferences": preference_dir(lake.path, dataset) if variant == "lkg_rag" else None,
        "base_model": current_base_model(lake.path),  # its tokenizer cuts the prompts' paths
        "adapter": adapter_dir(lake.path, dataset, llm) if llm and config.use_adapter else None,
        "prompts": prompts_file(lake.path, dataset, variant),  # its format, see below
        "accelerate_config": config.launch_file() if llm else None,
        "serving": pl.DataFrame([{"plan": json.dumps(plan, sort_keys=True)}]),
        "ltr_model": reports_dir(lake.path, dataset) / plan["ranker"]
        if plan["ranker"] in (LTR, LTR_LLM)
        else None,
    }
    database = warehouse_path(lake.path, dataset, "recommendations")
    previous = _previous_table(recommendations_file(lake.path, dataset))
    run = functools.partial(
        _recommend, context, config, lake.path, pipes_subprocess_client, plan, variant,
        sequences, items, database,
    )  # fmt: skip
    kept = {"table": previous, "duckdb": database}
    return reuse_or_run(context, lake.path, config, inputs, kept, run, returns="table")


def _recommend(
    context: dg.AssetExecutionContext,
    config: RecommendationRunConfig,
    lake: Path,
    pipes: dg.PipesSubprocessClient,
    plan: dict[str, Any],
    variant: str,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
    database: Path,
) -> Made:
    """Rank every user's next-item candidates with the planned ranker, write the table to
    DuckDB, and say how it went."""
    dataset, llm = str(context.partition_key), plan["variant"]
    context.log.info(f"serving {plan['ranker']}: {plan['because']}")
    core = RecommendConfig(top_n=config.top_n, max_users=config.max_users)
    examples = next_item_examples(load_retriever(retriever_dir(lake, dataset)), sequences, core)
    prompt_table, explanations, settings = _prompts_and_reasons(
        lake, dataset, variant, examples, sequences, items
    )
    launched: dict[str, Any] = {"llm_forward": "none: the served ranker reads no prompt"}
    if llm is None:
        ranked = retriever_order(examples)
    else:
        adapter = _adapter(lake, dataset, llm, config.use_adapter)
        ranked, launched = launch_ranking(context, pipes, lake, config, prompt_table, adapter)
        if plan["fusion"] is not None:
            fusion = plan["fusion"]
            prior = None if fusion["prior"] is None else np.asarray(fusion["prior"])
            ranked = fused_order(ranked, examples, fusion["lam"], prior)
    if plan["ranker"] in (LTR, LTR_LLM):
        llm_ranked = ranked if plan["ranker"] == LTR_LLM else None
        ranked = _ltr_order(lake, dataset, plan["ranker"], examples, sequences, items, llm_ranked)
    table = recommendation_table(
        examples,
        ranked,
        explanations,
        dict(items.select("item_idx", "title").iter_rows()),
        full_histories(sequences, config.max_users),
        variant,
        config.top_n,
        plan["ranker"],
    )
    write_tables(
        {"recommendations_df": table},
        "create table recommendations as select * from recommendations_df order by user_idx, rank;",
        database,
    )
    metadata = _recommendation_metadata(config, plan, variant, table, database, launched)
    metadata[SETTINGS_KEY] = dg.MetadataValue.json(json.loads(settings.to_json()))
    metadata["prompt_format"] = settings.prompt.format
    return Made({"table": table, "duckdb": database}, metadata)


def _recommendation_metadata(
    config: RecommendationRunConfig,
    plan: dict[str, Any],
    variant: str,
    table: pl.DataFrame,
    database: Path,
    launched: dict[str, Any],
) -> dict[str, Any]:
    sample = table.filter(pl.col("user_idx") < 2)
    return {
        "duckdb": dg.MetadataValue.path(str(database)),
        "served_ranker": plan["ranker"],
        "served_because": plan["because"],
        "runner_up": str(plan["runner_up"]),
        "variant": variant,
        "users": table["user_idx"].n_unique(),
        "distinct_items": table["item_idx"].n_unique(),
        "share_explained": round(float(table["explanation"].is_not_null().mean()), 4),
        **launched,  # scores, device, processes, prompts, seconds, rates, dtype
        "sample": dg.MetadataValue.md(
            markdown_table(sample.select("user_idx", "rank", "title", "ranker", "explanation"))
        ),
        "run_config": dg.MetadataValue.json(json.loads(config.model_dump_json())),
    }


def _ltr_order(
    lake: Path,
    dataset: str,
    name: str,
    examples: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
    llm_ranked: pl.DataFrame | None,
) -> pl.DataFrame:
    """`examples`' candidates ordered by the report's learned reranker `name`, its features
    made as for val/test: paths enumerated with kg_paths' own settings, the preference
    module's scores, the LLM's scores for `ltr+llm`."""
    result = load_ltr(reports_dir(lake, dataset) / name)
    folder = paths_folder(lake, dataset)
    kg = read_parquet(kg_folder(lake, dataset))
    paths = enumerate_paths(
        examples, sequences, kg.entities, kg.triples, kg.relations, items.height,
        read_path_config(lake, dataset),
    )  # fmt: skip
    preference = _preference_scores(lake, dataset, examples, paths.pair_features)
    return ltr_order(
        result, examples, sequences, items, paths.pair_features, preference,
        read_path_types(folder), llm_ranked,
    )  # fmt: skip


def _preference_scores(
    lake: Path, dataset: str, examples: pl.DataFrame, pair_features: pl.DataFrame
) -> pl.DataFrame:
    """The preference module's (example_id, candidate_item_idx, score) for `examples`."""
    model = load_preference(preference_dir(lake, dataset))
    return preference_scores(model, examples, pair_features, paths_folder(lake, dataset))


def _prompts_and_reasons(
    lake: Path,
    dataset: str,
    variant: str,
    examples: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
) -> tuple[pl.DataFrame, pl.DataFrame | None, PromptSettings]:
    """The variant's prompts for `examples`, made exactly as its training prompts were, and
    the reasons (selected KG paths) per candidate; no LLM runs here."""
    from transformers import AutoTokenizer

    # The adapter knows only prompts made as its training prompts were: every setting that
    # made them (prompt format and budgets, path enumeration, path selection) is read back
    # from the prompts file, never taken from defaults.
    trained = prompts_file(lake, dataset, variant)
    if not trained.exists():
        raise FileNotFoundError(
            f"{trained} does not exist: recommendations take their KG-path explanations (and, "
            f"for an LLM ranker, their prompts) as the variant's prompts were made; "
            f"materialise `prompts` for partition '{dataset}|{variant}' first, or name another "
            "variant in this stage's `variant`"
        )
    settings = PromptSettings.from_dict(
        recorded_settings(pl.read_parquet_metadata(trained), SETTINGS_KEY, str(trained))
    )
    tokenizer = AutoTokenizer.from_pretrained(current_base_model(lake))
    titles = dict(items.select("item_idx", "title").iter_rows())
    kg, preferences = None, None
    if variant != "llamarec":
        kg = read_parquet(kg_folder(lake, dataset))
    if variant == "lkg_rag":
        preferences = pl.read_parquet(preference_dir(lake, dataset) / "preferences.parquet")
    prompt_table, selected = prompts_as_trained(
        examples, sequences, titles, kg, preferences, variant, settings, tokenizer
    )
    explanations = None
    if selected is not None:
        explanations = explanation_texts(selected, titles, settings.prompt.item_verb)
    return prompt_table, explanations, settings
