"""Every third-party package the code imports is declared in pyproject.toml: the package's own
imports as runtime dependencies, the benchmarks' and tests' as runtime or dev ones. A package
that only arrives through another one (psutil through dagster, say) disappears the day that
one stops needing it."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"lkg_pipeline", "benchmarks", "lkg_pipeline_tests"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(group: str) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"]
    if group == "dev":
        requirements = requirements + project["optional-dependencies"]["dev"]
    return {canonical(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def imported(folder: Path) -> set[str]:
    """Top-level module names imported anywhere under `folder` (lazy imports included)."""
    names = set()
    for file in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - FIRST_PARTY - set(sys.stdlib_module_names)


@pytest.mark.parametrize(
    ("folder", "group"),
    [("lkg_pipeline", "runtime"), ("benchmarks", "dev"), ("lkg_pipeline_tests", "dev")],
)
def test_every_imported_package_is_declared(folder: str, group: str) -> None:
    distributions = packages_distributions()
    allowed = declared(group)
    missing = {}
    for module in sorted(imported(REPO / folder)):
        owners = {canonical(d) for d in distributions.get(module, [])}
        assert owners, f"{folder} imports {module!r}, which no installed distribution provides"
        if not owners & allowed:
            missing[module] = sorted(owners)
    assert not missing, f"{folder} imports packages pyproject.toml does not declare: {missing}"
