"""Running an LLM-stage script as its asset does: launched through Dagster Pipes."""

import dagster as dg

from lkg_pipeline_tests.dagster_cli import REPO


def launched(name: str, command: list[str], env: dict[str, str]) -> tuple[dict, list[str]]:
    """The metadata the script reported for an asset `name` (exactly one report: more or none
    fail) and the run's log messages."""

    @dg.asset(name=name)
    def reported(
        context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient
    ) -> dg.MaterializeResult:
        run = pipes_subprocess_client.run(command=command, context=context, env=env)
        return run.get_materialize_result()  # fails on zero or several reports

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [reported],
        resources={"pipes_subprocess_client": dg.PipesSubprocessClient(cwd=str(REPO))},
        instance=instance,
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node(name)
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    return {k: v.value for k, v in materialization.metadata.items()}, messages
