"""Group `paths`: KG paths from each user's history to each candidate, and the preference module."""

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

import dagster as dg
import matplotlib
import polars as pl

from lkg_pipeline.core.io.storage import ParquetParts, replace_atomically, replace_dir_atomically
from lkg_pipeline.core.kg.warehouse import read_parquet
from lkg_pipeline.core.llm.prompts import PATHS_KEY, path_settings_json
from lkg_pipeline.core.paths.batches import read_users
from lkg_pipeline.core.paths.enumeration import (
    PATH_SETTINGS_FILE,
    PathConfig,
    signal_by_type,
    write_paths,
)
from lkg_pipeline.core.paths.preference.grid import USERS_PER_BATCH
from lkg_pipeline.core.paths.preference.model import PreferenceConfig
from lkg_pipeline.core.paths.preference.training import (
    FittedPreferences,
    fit_preferences,
    save_fitted,
)
from lkg_pipeline.core.paths.selection import (
    PathSelection,
    SelectionTally,
    TieBreak,
    check_excluded_types,
    examples_changed_by_candidate_order,
    held_out_examples,
    selections_in_batches,
    write_selections,
)
from lkg_pipeline.core.paths.stats import mean_preference_by_type, path_sample, paths_by_type
from lkg_pipeline.core.paths.warehouse import write_paths_warehouse
from lkg_pipeline.defs.layout import (
    candidates_file,
    kg_folder,
    paths_folder,
    preference_dir,
    scratch_dir,
    warehouse_path,
)
from lkg_pipeline.defs.metadata import markdown_table, png_markdown
from lkg_pipeline.defs.partitions import dataset_partitions
from lkg_pipeline.defs.resources import DataLake
from lkg_pipeline.defs.reuse import versioned
from lkg_pipeline.defs.run_config import differs_from_core

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class PathRunConfig(dg.Config):
    """Run configuration mirroring `PathConfig`."""

    NOT_EXPOSED: ClassVar[dict[str, str]] = {}

    history_len: int = PathConfig.history_len
    max_hops: int = PathConfig.max_hops
    max_paths_per_pair: int = PathConfig.max_paths_per_pair
    max_attribute_degree: int | None = PathConfig.max_attribute_degree
    three_hop_max_degree: int = PathConfig.three_hop_max_degree
    # Users whose paths are enumerated together: bounds memory, never changes a path. Measured
    # on 10,000 ml-100k-like users: one batch 20.0 s and 1.8 GB peak, four of 2,500 18.7 s and
    # 1.0 GB (smaller joins, though pairs shared by two batches are solved in each).
    users_per_batch: int = 2_500

    def to_core(self) -> PathConfig:
        return PathConfig(**self.model_dump(exclude={"users_per_batch"}))


def read_path_config(lake: Path, dataset: str) -> PathConfig:
    """The `PathConfig` the current `kg_paths` were enumerated with."""
    file = paths_folder(lake, dataset) / PATH_SETTINGS_FILE
    if not file.exists():
        raise FileNotFoundError(
            f"{file} is missing: kg_paths was materialised before it recorded its settings; "
            "re-materialise kg_paths"
        )
    return PathConfig(**json.loads(file.read_text()))


@dg.asset(
    group_name="paths",
    partitions_def=dataset_partitions,
    code_version=versioned("5", __name__),  # 5: three-hop paths name their intermediate item
    kinds={"duckdb", "parquet"},
    deps=["kg_triples"],
    ins={"candidates": dg.AssetIn(), "sequences": dg.AssetIn(), "items": dg.AssetIn()},
    check_specs=[
        dg.AssetCheckSpec(
            "graph_carries_signal",
            asset="kg_paths",
            description="Warns unless true items have more paths on average than other candidates.",
        )
    ],
)
def kg_paths(
    context: dg.AssetExecutionContext,
    config: PathRunConfig,
    lake: DataLake,
    candidates: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
):
    """Per-type path counts for every (example, candidate) and a capped sample of paths."""
    dataset = context.partition_key
    kg = read_parquet(kg_folder(lake.path, dataset))
    graph_items = kg.entities.filter(pl.col("type") == "item").height
    if graph_items != items.height:  # else item ids past the graph's would read as users
        raise ValueError(
            f"the stored graph for {dataset} has {graph_items} items, `items` has "
            f"{items.height}: it was built from another preparation; materialise `kg_triples` "
            f"for {dataset} again"
        )
    folder = paths_folder(lake.path, dataset)
    stats: dict[str, float | int] = {}

    database = warehouse_path(lake.path, dataset, "paths")

    def write(staging: Path, database_tmp: Path) -> None:
        stats.update(
            write_paths(
                candidates,
                sequences,
                kg.entities,
                kg.triples,
                kg.relations,
                items.height,
                staging,
                config.to_core(),
                config.users_per_batch,
            )
        )
        write_paths_warehouse(staging, database_tmp)  # tables copied: no path to the staging

    # Both copies written in full before either replaces the old one, then swapped in back to
    # back (as `kg.warehouse.write_kg`): a failure leaves both of the previous build.
    replace_atomically(
        database, lambda tmp: replace_dir_atomically(folder, lambda staging: write(staging, tmp))
    )
    context.log.info(f"{dataset}: {stats}")
    yield dg.MaterializeResult(
        metadata=_paths_metadata(folder, database, stats, candidates, config.users_per_batch)
    )
    yield _signal_check(stats)


def _paths_metadata(
    folder: Path,
    database: Path,
    stats: dict[str, float | int],
    candidates: pl.DataFrame,
    users_per_batch: int,
) -> dict:
    # Summaries that never hold a whole table: the pair features streamed or a batch of
    # users at a time, the concrete paths (the largest table) only lend their first rows.
    features_file = folder / "pair_features.parquet"
    sample = path_sample(folder / "paths.parquet")
    statistics = pl.DataFrame({"statistic": list(stats), "value": [str(v) for v in stats.values()]})
    signal = signal_by_type(candidates, features_file, users_per_batch)
    return {
        "parquet": dg.MetadataValue.path(str(folder)),
        "duckdb": dg.MetadataValue.path(str(database)),
        "stats": dg.MetadataValue.md(markdown_table(statistics)),
        "paths_by_type": dg.MetadataValue.md(markdown_table(paths_by_type(features_file))),
        "signal_by_type": dg.MetadataValue.md(markdown_table(signal)),
        "sample": dg.MetadataValue.md(markdown_table(sample)),
        **{k: v for k, v in stats.items() if isinstance(v, int | float)},
    }


def _signal_check(stats: dict[str, float | int]) -> dg.AssetCheckResult:
    targets, others = stats["mean_paths_to_targets"], stats["mean_paths_to_non_targets"]
    return dg.AssetCheckResult(
        check_name="graph_carries_signal",
        passed=targets > others,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"true items: {targets:.1f} paths on average, other candidates: {others:.1f}",
        metadata={"mean_paths_to_targets": targets, "mean_paths_to_non_targets": others},
    )


class PreferenceRunConfig(dg.Config):
    """The preference module (`PreferenceConfig`)."""

    NOT_EXPOSED: ClassVar[dict[str, str]] = {}

    user_encoder: Literal["auto", "user_id", "history"] = differs_from_core(
        "auto", "auto trains both encoders and keeps the better on val (core: one)"
    )
    hidden: int = PreferenceConfig.hidden
    lr: float = PreferenceConfig.lr
    weight_decay: float = PreferenceConfig.weight_decay
    logit_l2: float = PreferenceConfig.logit_l2
    epochs: int = PreferenceConfig.epochs
    batch_size: int | None = PreferenceConfig.batch_size
    seed: int = PreferenceConfig.seed
    # Users whose path counts are read (and val/test examples scored) together: bounds memory,
    # never changes a result. The training grid itself (exact counts, 160 B per train or val
    # example) stays in memory.
    users_per_batch: int = USERS_PER_BATCH

    def to_core(self) -> PreferenceConfig:
        fields = PreferenceConfig.__dataclass_fields__
        values = {k: v for k, v in self.model_dump().items() if k in fields}
        values["user_encoder"] = "user_id" if self.user_encoder == "auto" else self.user_encoder
        return PreferenceConfig(**values)


@dg.asset(
    group_name="paths",
    partitions_def=dataset_partitions,
    code_version=versioned("2", __name__),
    kinds={"pytorch", "parquet"},
    deps=["kg_paths"],
    ins={"candidates": dg.AssetIn()},
)
def preference_model(
    context: dg.AssetExecutionContext,
    config: PreferenceRunConfig,
    lake: DataLake,
    candidates: pl.DataFrame,
) -> dg.MaterializeResult:
    """Per-user preferences over path types, learned so that paths to the next item win."""
    dataset = context.partition_key
    fitted = fit_preferences(
        candidates,
        paths_folder(lake.path, dataset),
        config.user_encoder,
        config.to_core(),
        config.users_per_batch,
    )
    result = fitted.result
    context.log.info(
        f"{dataset}: encoder {fitted.encoder} (val NDCG@10 {fitted.val_ndcg10_by_encoder}), "
        f"best epoch {result.best_epoch}, π shift {result.pi_shift}"
    )
    target = preference_dir(lake.path, dataset)
    replace_dir_atomically(target, functools.partial(save_fitted, fitted, dataset))
    return dg.MaterializeResult(metadata=_preference_metadata(fitted, target, dataset))


def _preference_metadata(fitted: FittedPreferences, target: Path, dataset: str) -> dict:
    result = fitted.result
    mean_pi = mean_preference_by_type(fitted.preferences)
    return {
        "path": dg.MetadataValue.path(str(target)),
        "encoder": fitted.encoder,
        "val_ndcg10_by_encoder": dg.MetadataValue.json(fitted.val_ndcg10_by_encoder),
        "best_epoch": result.best_epoch,
        "pi_shift": dg.MetadataValue.json(result.pi_shift),
        "metrics": dg.MetadataValue.md(markdown_table(_metrics_frame(fitted.report))),
        "mean_preference_by_type": dg.MetadataValue.md(markdown_table(mean_pi)),
        "loss_curve": dg.MetadataValue.md(_loss_plot(result.loss_history, dataset)),
    }


class SelectedPathsRunConfig(dg.Config):
    """Which enumerated paths each prompt shows (`PathSelection`)."""

    NOT_EXPOSED: ClassVar[dict[str, str]] = {}

    per_history_item: int = PathSelection.per_history_item
    max_paths: int = PathSelection.max_paths
    # Path types never shown (e.g. ["co_rated", "from_country"]), as the materialisation's
    # `selected_paths_per_variant` names them (`PathSelection`). Empty: every type, as the
    # reference.
    exclude_path_types: list[str] = []
    # Which candidate a tie between equally good paths goes to: `hashed` (a hash of example and
    # candidate, blind to the candidates' order), or the reference's `candidate_order`, which
    # on val/test hands ties to the retriever's first candidates and so leaks its rank into
    # the prompts (kept only to measure that; the `selection_blind_to_candidate_order` check
    # fails with it).
    tie_break: TieBreak = PathSelection.tie_break
    # Users whose paths are selected together, at most this many users and this many
    # enumerated paths (a user with more is a batch alone): bounds memory, never changes a
    # selected path. The path budget is what holds with a dense graph: a batch of 1.4M
    # Beauty-like paths added ~0.75 GB (benchmarks/paths/AFTER_PATHS.md), and 2,500 ml-100k-like
    # users hold ~9M. `paths_per_batch: null` cuts by users alone.
    users_per_batch: int = 2_500
    paths_per_batch: int | None = 1_500_000


@dg.asset(
    group_name="paths",
    partitions_def=dataset_partitions,
    # 3: ties between candidates broken by a hash, not by the retriever's order
    code_version=versioned("3", __name__),
    kinds={"polars", "parquet"},
    deps=["kg_paths", "preference_model", "candidates"],
    check_specs=[
        dg.AssetCheckSpec(
            "selection_blind_to_candidate_order",
            asset="selected_paths",
            blocking=True,
            description=(
                "Fails if listing a sample of examples' candidates in reverse changes which "
                "paths they show: on val/test the order is the retriever's, and prompts would "
                "carry its rank to the LLM."
            ),
        )
    ],
)
def selected_paths(
    context: dg.AssetExecutionContext, config: SelectedPathsRunConfig, lake: DataLake
) -> Iterator[dg.Output[ParquetParts] | dg.AssetCheckResult]:
    """The paths each prompt shows: for `kg_rag` the shortest, for `lkg_rag` the ones the
    user's learned preferences rank first (per history item, then up to a cap), ties between
    candidates broken without looking at their order (`select_paths`).

    A batch of users at a time: the enumerated paths are the largest table of the pipeline
    (608M rows at 1M Beauty-like users), so they are never read whole; the selection is
    written in parts, which the IO manager concatenates into the asset's file.
    """
    dataset = context.partition_key
    paths_file = paths_folder(lake.path, dataset) / "paths.parquet"
    preferences = pl.read_parquet(preference_dir(lake.path, dataset) / "preferences.parquet")
    selection = PathSelection(
        config.per_history_item,
        config.max_paths,
        tuple(config.exclude_path_types),
        config.tie_break,
    )
    check_excluded_types(selection, preferences, f"selected_paths {dataset}")
    parts = ParquetParts(scratch_dir(lake.path) / f"selected_paths-{dataset}")
    try:
        batches = selections_in_batches(
            paths_file, preferences, selection, config.users_per_batch, config.paths_per_batch
        )
        held_out = held_out_examples(candidates_file(lake.path, dataset))
        tally = write_selections(batches, parts, held_out)
        made_with = path_settings_json(read_path_config(lake.path, dataset), selection)
        # the IO manager writes the file before the parts are removed
        yield dg.Output(parts, metadata=_selected_metadata(tally, parts, selection, made_with))
    finally:
        parts.remove()
    yield _order_blindness_check(paths_file, preferences, selection)


def _selected_metadata(
    tally: SelectionTally, parts: ParquetParts, selection: PathSelection, made_with: str
) -> dict:
    return {
        "rows": tally.rows,
        "user_batches": len(parts.files),
        "tie_break": selection.tie_break,
        # on val/test the position is the retriever's rank (see the check)
        "val_test_paths_by_candidate_position": dg.MetadataValue.md(
            markdown_table(tally.by_candidate_position)
        ),
        "paths_per_prompt": dg.MetadataValue.md(markdown_table(tally.per_prompt)),
        "selected_paths_per_variant": dg.MetadataValue.md(markdown_table(tally.per_variant)),
        # also written into the file (ParquetIOManager): what prompts record as theirs
        PATHS_KEY: dg.MetadataValue.json(json.loads(made_with)),
    }


ORDER_CHECK_USERS = 50  # users whose selections are made again in reverse candidate order


def _order_blindness_check(
    paths_file: Path, preferences: pl.DataFrame, selection: PathSelection
) -> dg.AssetCheckResult:
    users = preferences["user_idx"].unique().sort().head(ORDER_CHECK_USERS)
    paths = read_users(paths_file, users)
    mine = preferences.filter(pl.col("user_idx").is_in(users.implode()))
    changed = {
        "kg_rag": examples_changed_by_candidate_order(paths, None, selection),
        "lkg_rag": examples_changed_by_candidate_order(paths, mine, selection),
    }
    examples = paths["example_id"].n_unique()
    return dg.AssetCheckResult(
        check_name="selection_blind_to_candidate_order",
        passed=not any(changed.values()),
        description=(
            f"examples of the first {users.len()} users whose paths change when their "
            f"candidates are listed in reverse: kg_rag {changed['kg_rag']}, lkg_rag "
            f"{changed['lkg_rag']} of {examples} (tie_break {selection.tie_break})"
        ),
        metadata={"examples_checked": examples, **{f"changed_{k}": v for k, v in changed.items()}},
    )


def _metrics_frame(report: dict) -> pl.DataFrame:
    rows = []
    for ranker, splits in report.items():
        for split, populations in splits.items():
            for population, metrics in populations.items():
                rows.append({"ranker": ranker, "split": split, "population": population, **metrics})
    return pl.DataFrame(rows)


def _loss_plot(history: list[dict], dataset: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["loss"] for h in history], label="train loss")
    if "val_loss" in history[0]:
        ax.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax.set(xlabel="epoch", title=f"{dataset}: preference module")
    ax.legend()
    markdown = png_markdown(fig, "preference loss")
    plt.close(fig)
    return markdown
