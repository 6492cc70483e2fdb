"""docs/stages.md names every run-configuration field of every asset, with its default.

The page is the user's reference to the launchpad; it states each default a second time, so
this test keeps the two statements one fact: a field added, renamed or given a new default in a
Config class fails here until the page says so.
"""

import re
import warnings
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "docs" / "stages.md"
FIELD = re.compile(r"`(\w+)`(?:\s+/\s+`(\w+)`)?(?:\s+\(([^()]*(?:\([^()]*\)[^()]*)*)\))?")


def config_defaults() -> dict[str, dict[str, Any]]:
    """op name → {field: default (or REQUIRED)} from the loaded definitions."""
    from lkg_pipeline.definitions import defs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = defs().resolve_asset_graph()
    out: dict[str, dict[str, Any]] = {}
    for asset in graph.assets_defs:
        schema = asset.op.config_schema
        fields = getattr(getattr(schema, "config_type", None), "fields", None)
        if fields:
            out[asset.op.name] = {
                name: field.default_value if field.default_provided else "REQUIRED"
                for name, field in fields.items()
            }
    return out


def documented() -> dict[str, dict[str, str | None]]:
    """op name → {field: the default as written} from each asset's `Config:` paragraph: the
    block opens with the asset's bold name (or `(op <name>`; or a heading naming one asset) and
    the paragraph runs to the
    next line that starts a new statement (Checks, Metadata, a blank line)."""
    text = STAGES.read_text()
    out: dict[str, dict[str, str | None]] = {}
    for block in re.split(r"\n(?=\*\*`|## )", text):
        head = re.match(r"\*\*`(\w+)`|## [^(\n]*\(`(\w+)`\)", block)
        if head is None or "\nConfig:" not in block:
            continue
        op = re.search(r"\(op `(\w+)`", block)
        name = op.group(1) if op else head.group(1) or head.group(2)
        paragraph = block.split("\nConfig:", 1)[1]
        paragraph = re.split(r"\n(?:Checks|Metadata|\n|- |#)", paragraph, maxsplit=1)[0]
        fields: dict[str, str | None] = {}
        for first, second, value in FIELD.findall(paragraph):
            for field in filter(None, (first, second)):
                fields.setdefault(field, value or None)
        out[name] = fields
    return out


def as_written(value: Any) -> str:
    """A default as the page writes it: none, true/false, numbers with thousands commas."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def test_every_config_field_is_on_the_page_and_every_named_field_exists() -> None:
    defaults, page = config_defaults(), documented()
    assert set(defaults) <= set(page), (
        f"assets with config but no Config paragraph: {sorted(set(defaults) - set(page))}"
    )
    for op, fields in defaults.items():
        missing = set(fields) - set(page[op])
        assert not missing, f"docs/stages.md, {op}: config fields not documented: {sorted(missing)}"


@pytest.mark.parametrize("op", sorted(config_defaults()))
def test_each_documented_scalar_default_is_the_configs(op: str) -> None:
    """Where the page writes a default as a plain scalar (a number, true/false, none, a code
    word), it is the Config class's; prose defaults (`dataset's`, `every linear layer: …`) are
    for a reader and not compared."""
    defaults, page = config_defaults()[op], documented()[op]
    for field, written in page.items():
        if field not in defaults or written is None:
            continue
        head = re.split(r"[;:]", written, maxsplit=1)[0].strip().strip("`").strip('"')
        default = defaults[field]
        if isinstance(default, (list, dict)) or default == "REQUIRED":
            continue
        if re.fullmatch(r"none|true|false|[-+]?[\d,]*\.?\d+(e[-+]?\d+)?", head):
            expected = as_written(default)
            number = re.fullmatch(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?", head)
            if number and not isinstance(default, bool) and default is not None:
                assert float(head.replace(",", "")) == pytest.approx(float(default)), (
                    f"docs/stages.md, {op}.{field}: page says {head}, config {expected}"
                )
            else:
                assert head == expected, (
                    f"docs/stages.md, {op}.{field}: page says {head}, config {expected}"
                )
        elif re.fullmatch(r"[a-z_][\w.-]*", head) and isinstance(default, str):
            assert head == default, (
                f"docs/stages.md, {op}.{field}: page says {head}, config {default}"
            )
