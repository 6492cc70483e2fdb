"""The one `Definitions` object: everything under `lkg_pipeline/defs`, loaded by convention."""

from pathlib import Path

import dagster as dg

from lkg_pipeline.defs import pool_wait


@dg.definitions
def defs() -> dg.Definitions:
    pool_wait.install()  # steps waiting for a `torch` slot sleep and say who holds it
    # Every step of a run in the run's own process. Dagster's default starts a process per
    # step, and each spends ~7 s importing and loading this code location before it does
    # anything (on 2 cores of an AMD EPYC the dataset stages for 40 users take 64 s that way,
    # 22 s in one process), more than most of our steps compute. Nothing is lost
    # by it: training and ranking already run in their own processes (`accelerate launch`
    # through Pipes), the `torch` pool still queues those steps across runs (the in-process
    # executor honours instance concurrency), and on two cores steps barely overlap anyway.
    # A deployment with cores to spare for parallel steps can set `dg.multiprocess_executor`.
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=dg.in_process_executor),
    )
