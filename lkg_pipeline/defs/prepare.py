"""Group `prepare`: clean items and leave-one-out user sequences, with their invariants checked."""

import dagster as dg
import polars as pl

from lkg_pipeline.core.data import validate
from lkg_pipeline.core.data.prepare import TITLE_STYLES, PrepareConfig, prepare
from lkg_pipeline.defs.metadata import markdown_table
from lkg_pipeline.defs.partitions import dataset_partitions
from lkg_pipeline.defs.reuse import versioned

ITEM_CHECKS = {
    "unique_item_ids": lambda items: validate.unique_ids(items, "item_idx", "item_id"),
    "dense_item_ids": lambda items: validate.dense_ids(items, "item_idx"),
    "non_empty_titles": validate.non_empty_titles,
}
SEQUENCE_CHECKS = {
    "dense_user_ids": lambda seqs: validate.dense_ids(seqs, "user_idx"),
    "min_three_interactions_per_user": validate.min_sequence_length,
    "leave_one_out_consistent": validate.leave_one_out_consistent,
}


class PrepareRunConfig(dg.Config):
    """Run configuration mirroring `PrepareConfig`; defaults are the paper's."""

    min_user_interactions: int = PrepareConfig.min_user_interactions
    min_item_interactions: int = PrepareConfig.min_item_interactions
    min_rating: float | None = PrepareConfig.min_rating
    drop_placeholder_titles: bool = PrepareConfig.drop_placeholder_titles
    # a seeded sample of users (quick runs, CI); None: all
    max_users: int | None = PrepareConfig.max_users
    seed: int = PrepareConfig.seed

    def to_core(self) -> PrepareConfig:
        return PrepareConfig(**self.model_dump())


@dg.multi_asset(
    outs={
        "items": dg.AssetOut(
            group_name="prepare",
            code_version=versioned("1", __name__),
            is_required=False,
            kinds={"polars", "parquet"},
            description="Kept items: dense item_idx (by native id), cleaned title, metadata.",
        ),
        "sequences": dg.AssetOut(
            group_name="prepare",
            code_version=versioned("1", __name__),
            is_required=False,
            kinds={"polars", "parquet"},
            description="One row per kept interaction, in user order, with its split.",
        ),
    },
    ins={"raw_interactions": dg.AssetIn(), "raw_items": dg.AssetIn()},
    partitions_def=dataset_partitions,
    can_subset=True,  # both come from one computation; only the selected ones are written
    check_specs=[
        *(dg.AssetCheckSpec(name, asset="items", blocking=True) for name in ITEM_CHECKS),
        *(dg.AssetCheckSpec(name, asset="sequences", blocking=True) for name in SEQUENCE_CHECKS),
    ],
)
def prepared_tables(
    context: dg.AssetExecutionContext,
    config: PrepareRunConfig,
    raw_interactions: pl.DataFrame,
    raw_items: pl.DataFrame,
):
    """k-core, re-index and split (one step: the ids depend on what the k-core keeps)."""
    title_style = TITLE_STYLES[context.partition_key]
    result = prepare(raw_interactions, raw_items, config.to_core(), title_style=title_style)
    context.log.info(f"{context.partition_key}: {result.stats}")
    selected = context.op_execution_context.selected_output_names
    if "items" in selected:
        yield dg.Output(
            result.items,
            output_name="items",
            metadata={
                "items": result.items.height,
                "items_without_title": result.stats["items_without_title"],
                "title_style": title_style,
                "sample": dg.MetadataValue.md(
                    markdown_table(
                        result.items.head(10).select("item_idx", "item_id", "raw_title", "title")
                    )
                ),
            },
        )
    if "sequences" in selected:
        yield dg.Output(
            result.sequences,
            output_name="sequences",
            metadata={
                "stats": dg.MetadataValue.md(_stats_markdown(context.partition_key, result.stats)),
                **{k: v for k, v in result.stats.items() if isinstance(v, int | float)},
            },
        )
    checks = {("items", n): c(result.items) for n, c in ITEM_CHECKS.items()}
    checks |= {("sequences", n): c(result.sequences) for n, c in SEQUENCE_CHECKS.items()}
    for check_key in context.selected_asset_check_keys:
        asset, name = check_key.asset_key.to_user_string(), check_key.name
        yield _result(asset, name, checks[asset, name])


def _result(asset: str, name: str, outcome: validate.Outcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=asset,
        check_name=name,
        passed=outcome.passed,
        description=outcome.description,
        metadata=outcome.metadata,
    )


def _stats_markdown(dataset: str, stats: dict[str, float | int]) -> str:
    shown = [
        ("users", "{:,}"),
        ("items", "{:,}"),
        ("interactions", "{:,}"),
        ("density", "{:.4%}"),
        ("mean_sequence_length", "{:.1f}"),
        ("median_sequence_length", "{:.1f}"),
        ("min_sequence_length", "{}"),
        ("max_sequence_length", "{}"),
        ("train_interactions", "{:,}"),
        ("val_interactions", "{:,}"),
        ("test_interactions", "{:,}"),
        ("users_with_tied_last_two", "{:,}"),
        ("raw_interactions", "{:,}"),
        ("items_without_title", "{:,}"),
        ("interactions_unknown_item", "{:,}"),
        ("interactions_untitled_item", "{:,}"),
        ("duplicate_pairs_dropped", "{:,}"),
        ("k_core_rounds", "{}"),
    ]
    rows = "\n".join(f"| {name} | {fmt.format(stats[name])} |" for name, fmt in shown)
    return f"**{dataset}**\n\n| statistic | value |\n|---|---|\n{rows}"
