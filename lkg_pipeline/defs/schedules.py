"""Schedules: weekly retraining of every dataset that has data. Off until a person turns it on."""

import dagster as dg

from lkg_pipeline.defs.jobs import retrain_dataset
from lkg_pipeline.defs.partitions import dataset_partitions


def datasets_with_data(instance: dg.DagsterInstance) -> list[str]:
    """Dataset partitions whose `sequences` were materialised: the ones retraining can run on
    (the others have never been ingested, or have no source here)."""
    done = instance.get_materialized_partitions(dg.AssetKey("sequences"))
    return [d for d in dataset_partitions.get_partition_keys() if d in done]


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
        return dg.SkipReason("no dataset has materialised sequences yet: nothing to retrain")
    week = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return [dg.RunRequest(partition_key=d, run_key=f"{d}:{week}") for d in datasets]
