"""Run-configuration defaults that differ from the core's on purpose, each with its reason.

A stage's run configuration copies every core default by reference; where it means to differ
(a CPU budget, a recipe measured to learn), the field says so once, with `differs_from_core`.
The reason becomes the field's description, shown beside it in the Dagster UI launchpad, and
the tests (test_run_config.py) fail on any difference not declared this way.
"""

from typing import Any

import pydantic

DIFFERS = "Differs from the core default: "


def differs_from_core(default: Any, why: str) -> Any:
    return pydantic.Field(default=default, description=DIFFERS + why)


def core_differences(config: type[pydantic.BaseModel]) -> dict[str, str]:
    """The declared differences of a run configuration class: field name → reason."""
    return {
        name: field.description.removeprefix(DIFFERS)
        for name, field in config.model_fields.items()
        if field.description and field.description.startswith(DIFFERS)
    }
