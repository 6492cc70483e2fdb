"""Schedules: weekly retraining of every dataset that has data. Off until a person turns it on."""

import dagster as dg

from lkg_pipeline.defs.jobs import retrain_dataset
from lkg_pipeline.defs.partitions import dataset_partitions


def datasets_with_data(instance: dg.DagsterInstance) -> list[str]:
    """Dataset partitions whose `sequences` and `kg_triples` were materialised: the ones
    retraining can run on (the others were never ingested, have no source here, or stopped
    before the graph, which `kg_paths` needs)."""
    done = [
        instance.get_materialized_partitions(dg.AssetKey(name))
        for name in ("sequences", "kg_triples")
    ]
    return [d for d in dataset_partitions.get_partition_keys() if all(d in s for s in done)]


@dg.schedule(
    job=retrain_dataset,
    cron_schedule="0 3 * * 1",  # Mondays 03:00
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain and re-evaluate every dataset that has data, once a week.",
)
def weekly_retrain(context: dg.ScheduleEvaluationContext):
    datasets = datasets_with_data(context.instance)
    if not datasets:
        return dg.SkipReason(
            "no dataset has materialised sequences and kg_triples yet: nothing to retrain"
        )
    week = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return [dg.RunRequest(partition_key=d, run_key=f"{d}:{week}") for d in datasets]
