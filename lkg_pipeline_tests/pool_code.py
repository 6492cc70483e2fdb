"""A code location of one asset in the `torch` pool that sleeps: the pool-wait tests run two
of its runs against one instance, as two `make run`s would, without the cost of real steps."""

import time

import dagster as dg

from lkg_pipeline.defs import pool_wait


class Hold(dg.Config):
    seconds: float = 0.0


@dg.asset(pool="torch")
def hold(config: Hold) -> None:
    time.sleep(config.seconds)


@dg.definitions
def defs() -> dg.Definitions:
    pool_wait.install()
    return dg.Definitions(assets=[hold], executor=dg.in_process_executor)
