"""Group `retrieval`: the retriever (LRURec or SASRec) per dataset and its candidates."""

import dataclasses
import functools
from pathlib import Path
from typing import ClassVar, Literal, get_args

import dagster as dg
import matplotlib
import polars as pl

from lkg_pipeline.core.data import validate
from lkg_pipeline.core.io.storage import replace_dir_atomically
from lkg_pipeline.core.retrieval.candidates import (
    candidate_table,
    held_out_training_candidates,
    retrieve_candidates,
    training_candidates,
)
from lkg_pipeline.core.retrieval.device import model_device, resolve_device
from lkg_pipeline.core.retrieval.seqrec import (
    ARCHITECTURES,
    RetrieverConfig,
    SelectionMetric,
    SequentialRecommender,
    load_retriever,
)
from lkg_pipeline.core.retrieval.sequences import UserSequences, user_sequences
from lkg_pipeline.core.retrieval.stats import coverage_by_split, train_retrieved
from lkg_pipeline.core.retrieval.training import (
    TrainResult,
    progress,
    report_with_popularity,
    save_trained,
    train_retriever,
)
from lkg_pipeline.defs.layout import retriever_dir
from lkg_pipeline.defs.metadata import markdown_table, png_markdown
from lkg_pipeline.defs.partitions import dataset_partitions
from lkg_pipeline.defs.resources import TORCH_POOL, DataLake
from lkg_pipeline.defs.reuse import Made, Recomputable, reuse_or_run, versioned
from lkg_pipeline.defs.run_config import differs_from_core

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The published max_len: 200 for MovieLens, 50 for Amazon (shared DESIGN.md §1).
DEFAULT_MAX_LEN = {"ml-100k": 200, "ml-latest-small": 200, "beauty": 50}
# Each dataset's best setting on validation from `make tune-retriever`
# (benchmarks/retrieval/RETRIEVER_TUNING.md, every trial there); a field a run sets explicitly
# wins. Datasets not searched yet keep the published LRURec recipe.
TUNED: dict[str, dict[str, object]] = {
    # val NDCG@10 0.1263 against 0.1088 for the published LRURec recipe (paired p 0.009)
    "ml-100k": {"architecture": "sasrec", "max_len": 50, "selection_metric": "NDCG@10"},
}
# 50 and 100: what a longer candidate list would let the ranker reach (Recall@k = coverage)
REPORT_KS = (1, 5, 10, 20, 50, 100)
FAMILY_NAMES = {"lrurec": "LRURec", "sasrec": "SASRec"}
METRICS = get_args(SelectionMetric)


class RetrieverRunConfig(Recomputable):
    """The retriever's family and hyperparameters, and the seed that makes a CPU run repeat."""

    # Fields whose None means "the dataset's default" (to_core); TUNED may set only these.
    DATASET_DEFAULTS: ClassVar[tuple[str, ...]] = ("architecture", "max_len", "selection_metric")
    NOT_CORE: ClassVar[tuple[str, ...]] = ("recompute", "device")
    NOT_EXPOSED: ClassVar[dict[str, str]] = {"n_items": "the prepared catalogue's size"}

    # "lrurec" | "sasrec". A plain str: Dagster cannot express an optional Literal.
    architecture: str | None = differs_from_core(
        None, "None: the dataset's tuned family (TUNED), else the core's"
    )
    d_model: int = RetrieverConfig.d_model
    n_layers: int = RetrieverConfig.n_layers
    n_heads: int = RetrieverConfig.n_heads  # sasrec only
    dropout: float = RetrieverConfig.dropout
    max_len: int | None = differs_from_core(
        None, "None: the dataset's (TUNED, else 200 MovieLens, 50 Amazon), in to_core"
    )
    lr: float = RetrieverConfig.lr
    weight_decay: float = RetrieverConfig.weight_decay
    grad_clip: float = RetrieverConfig.grad_clip
    batch_size: int = RetrieverConfig.batch_size
    max_epochs: int = RetrieverConfig.max_epochs
    patience: int = RetrieverConfig.patience  # epochs without a better val selection_metric
    selection_metric: str | None = differs_from_core(  # "Recall@10" | "NDCG@10"
        None, "None: the dataset's tuned metric (TUNED), else the core's"
    )
    seed: int = RetrieverConfig.seed
    r_min: float = RetrieverConfig.r_min
    r_max: float = RetrieverConfig.r_max
    sliding_step: int | None = RetrieverConfig.sliding_step
    eval_batch_size: int = RetrieverConfig.eval_batch_size
    # None: the full softmax; N: the target against N uniform negatives per batch (for very
    # large catalogues; benchmarks/retrieval/SAMPLED_SOFTMAX.md measures it against the full
    # softmax)
    sampled_negatives: int | None = RetrieverConfig.sampled_negatives
    # Where the model trains and scores: auto = CUDA when present (on the CPU the results are
    # the reference, bit for bit the same as before the option existed).
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def to_core(self, dataset: str, n_items: int) -> RetrieverConfig:
        """The core config: what this run set, else the dataset's tuned defaults (`TUNED`),
        else the published ones (max_len per dataset, the rest as in the core). "Not set" is
        None: Dagster hands every field to the config, defaults included, so a default equal
        to the core's could not be told apart from a choice."""
        for name, allowed in (("architecture", ARCHITECTURES), ("selection_metric", METRICS)):
            if getattr(self, name) not in (None, *allowed):
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of {allowed}")
        values = self.model_dump(exclude=set(self.NOT_CORE))
        fallback = {"max_len": DEFAULT_MAX_LEN[dataset], **TUNED.get(dataset, {})}
        for name, value in fallback.items():
            if values[name] is None:
                values[name] = value
        for name in self.DATASET_DEFAULTS:
            if values[name] is None:  # neither set nor tuned: the core's own default
                del values[name]
        return RetrieverConfig(n_items=n_items, **values)


class CandidatesRunConfig(dg.Config):
    k: int = 20  # candidates per example (the ranker's letters A..T)
    train_policy: Literal["random", "retriever"] = "retriever"
    train_examples_per_user: int | None = 1  # last k train prefixes per user; None = all
    # Which retriever scores the train prefixes (policy "retriever"). shared: the `retriever`
    # asset, which trained on them (sharper on them than on val: ml-100k, SASRec, recall@20
    # 0.54 vs 0.35). held_out: per prefix, a retriever of the same config trained on the
    # sequences cut before its target (core.retrieval.candidates.held_out_training_candidates):
    # train examples are scored as val is, at one retriever training per
    # `train_examples_per_user`.
    train_scored_by: Literal["shared", "held_out"] = "shared"
    # Keep only the train examples whose target the retriever ranked in its top k (instead
    # of putting it in): they then look like the val/test subset the ranker is scored on.
    train_retrieved_only: bool = False
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"  # as the retriever's


@dg.asset(
    group_name="retrieval",
    pool=TORCH_POOL,  # one such step at a time (dagster.yaml)
    partitions_def=dataset_partitions,
    code_version=versioned("1", __name__),
    kinds={"pytorch", "safetensors"},
    ins={"sequences": dg.AssetIn(), "items": dg.AssetIn()},
)
def retriever(
    context: dg.AssetExecutionContext,
    config: RetrieverRunConfig,
    lake: DataLake,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
) -> dg.MaterializeResult:
    """The retriever trained on train sequences, early-stopped on its validation metric."""
    dataset = context.partition_key
    target = retriever_dir(lake.path, dataset)
    inputs = {"sequences": sequences, "items": items}
    train = functools.partial(_train_retriever, context, config, dataset, target, sequences, items)
    return reuse_or_run(context, lake.path, config, inputs, {"model": target}, train)


def _train_retriever(
    context: dg.AssetExecutionContext,
    config: RetrieverRunConfig,
    dataset: str,
    target: Path,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
) -> Made:
    data = user_sequences(sequences, n_items=items.height)
    core_config = config.to_core(dataset, items.height)
    device = resolve_device(config.device)
    name = FAMILY_NAMES[core_config.architecture]

    def log(record: dict) -> None:
        context.log.info(f"{dataset} {name} {progress(record)}")

    result = train_retriever(data, core_config, on_log=log, device=device)
    report = report_with_popularity(result, data, name, REPORT_KS, 20)
    code_version = context.assets_def.code_versions_by_key[context.asset_key]
    write = functools.partial(save_trained, result, core_config, dataset, code_version, report)
    replace_dir_atomically(target, write)
    metadata = _retriever_metadata(target, name, core_config, device, result, report, dataset)
    return Made({"model": target}, metadata)


def _retriever_metadata(
    target: Path,
    name: str,
    core_config: RetrieverConfig,
    device: str,
    result: TrainResult,
    report: dict,
    dataset: str,
) -> dict:
    return {
        "path": dg.MetadataValue.path(str(target)),
        "architecture": name,
        # the resolved settings: this run's, else the dataset's tuned defaults (TUNED)
        "config": dg.MetadataValue.json(dataclasses.asdict(core_config)),
        "device": device,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_seconds": round(result.wall_time_s, 1),
        "test_NDCG@10": report[name]["test"]["NDCG@10"],
        "test_Recall@20": report[name]["test"]["Recall@20"],
        "test_Recall@50": report[name]["test"]["Recall@50"],
        "test_Recall@100": report[name]["test"]["Recall@100"],
        "metrics": dg.MetadataValue.md(markdown_table(_metrics_frame(report))),
        "curves": dg.MetadataValue.md(_curves(result.history, dataset)),
    }


def _metrics_frame(report: dict) -> pl.DataFrame:
    rows = []
    for model, splits in report.items():
        for split, metrics in splits.items():
            rows.append({"model": model, "split": split, **metrics})
    return pl.DataFrame(rows)


def _curves(history: list[dict], dataset: str) -> str:
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.plot(epochs, [h["loss"] for h in history])
    left.set(xlabel="epoch", ylabel="train loss", title=f"{dataset}: retriever loss")
    for key in ("val_Recall@10", "val_NDCG@10"):
        right.plot(epochs, [h[key] for h in history], label=key)
    right.set(xlabel="epoch", title="validation")
    right.legend()
    markdown = png_markdown(fig, "training curves")
    plt.close(fig)
    return markdown


def train_examples(
    context: dg.AssetExecutionContext,
    config: CandidatesRunConfig,
    data: UserSequences,
    model: SequentialRecommender,
) -> pl.DataFrame:
    """The ranker's training examples as the run configuration asks, or a clear error."""
    if config.train_policy == "random" and (
        config.train_scored_by != "shared" or config.train_retrieved_only
    ):
        raise ValueError(
            "train_scored_by: held_out and train_retrieved_only need train_policy: retriever "
            "(uniform negatives have no retriever scores)"
        )
    if config.train_scored_by == "held_out":
        if config.train_examples_per_user is None:
            raise ValueError(
                "train_scored_by: held_out trains one retriever per prefix: set "
                "train_examples_per_user to a number (e.g. 2), not None (every prefix)"
            )
        return held_out_training_candidates(
            data,
            model.config,
            n_candidates=config.k,
            examples_per_user=config.train_examples_per_user,
            seed=config.seed,
            retrieved_only=config.train_retrieved_only,
            device=str(model_device(model)),
            on_log=lambda r: context.log.info(
                f"held-out retriever epoch {r['epoch']}: val Recall@10 {r['val_Recall@10']:.4f}"
            ),
        )
    train = training_candidates(
        data,
        config.train_policy,
        model,
        n_candidates=config.k,
        examples_per_user=config.train_examples_per_user,
        seed=config.seed,
    )
    if config.train_retrieved_only:
        train = train.filter(pl.col("target_rank") <= config.k)
    return train


@dg.asset(
    group_name="retrieval",
    pool=TORCH_POOL,  # held-out retrievers train here (train_scored_by: held_out)
    partitions_def=dataset_partitions,
    code_version=versioned("1", __name__),
    kinds={"polars", "parquet"},
    deps=["retriever"],
    ins={"sequences": dg.AssetIn(), "items": dg.AssetIn()},
    check_specs=[dg.AssetCheckSpec("candidates_well_formed", asset="candidates", blocking=True)],
)
def candidates(
    context: dg.AssetExecutionContext,
    config: CandidatesRunConfig,
    lake: DataLake,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
):
    """Top-k retriever candidates for val/test and the ranker's training examples."""
    dataset = context.partition_key
    device = resolve_device(config.device)
    model = load_retriever(retriever_dir(lake.path, dataset)).to(device)
    if model.config.n_items != items.height:  # out-of-range ids, or an IndexError, otherwise
        raise ValueError(
            f"the stored retriever for {dataset} knows {model.config.n_items} items, `items` "
            f"has {items.height}: it was trained on another preparation; materialise "
            f"`retriever` for {dataset} again"
        )
    data = user_sequences(sequences, n_items=items.height)
    evaluated = retrieve_candidates(model, data, k=config.k)
    train = train_examples(context, config, data, model)
    table = candidate_table(evaluated, train, data)
    yield dg.Output(table, metadata=_candidates_metadata(table, config, device))
    yield _candidates_check(table, sequences, config.k)


def _candidates_metadata(table: pl.DataFrame, config: CandidatesRunConfig, device: str) -> dict:
    coverage = coverage_by_split(table)
    return {
        "device": device,
        "train_policy": config.train_policy,
        "train_scored_by": config.train_scored_by,
        "train_retrieved_only": config.train_retrieved_only,
        "examples": dg.MetadataValue.md(
            markdown_table(table.group_by("split").len().sort("split"))
        ),
        "coverage": dg.MetadataValue.md(markdown_table(coverage)),
        "test_coverage": float(coverage.filter(pl.col("split") == "test")["coverage"][0]),
        # Train prefixes are ones the retriever was fitted on: its top-k holds their
        # target more often than val's (ml-100k, SASRec: 0.54 vs 0.35), and the rest get the
        # target put in. A ranker trained over the retriever's scores sees that prior.
        "train_retrieved": _or_why_not(train_retrieved(table, config.k), config),
    }


def _or_why_not(share: float | None, config: CandidatesRunConfig) -> float | str:
    if share is not None:
        return share
    if config.train_policy == "random":
        return "not applicable: train candidates are drawn at random (train_policy: random)"
    return "not applicable: no train examples"


def _candidates_check(table: pl.DataFrame, sequences: pl.DataFrame, k: int) -> dg.AssetCheckResult:
    outcome = validate.candidates_well_formed(table, sequences, k)
    return dg.AssetCheckResult(
        check_name="candidates_well_formed",
        passed=outcome.passed,
        description=outcome.description,
        metadata=outcome.metadata,
    )
