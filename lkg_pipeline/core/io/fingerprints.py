"""Content fingerprints, and the stamps that let a stage skip work it has already done.

`dagster asset materialize` re-executes everything it selects, and the expensive stages (the
retriever, LoRA training, ranking, recommendations) take minutes to hours. A stage that finds
its inputs, settings and code exactly as they were when it last completed, and its outputs
still as it left them, can reuse them. Dagster's own answer (stale status, "materialize changed
and missing") lives in the UI and the daemon, not in the CLI or in a run that selects the
asset, and it does not see run configuration; so the comparison is made here, on content:

- `fingerprint` hashes what a stage is made from (settings, files, folders, frames);
- a `Stamp` records, per (stage, partition), the fingerprint a completed run was made from,
  the digests of the outputs it left and the metadata it reported;
- the stamp is removed *before* a stage rewrites its outputs and written only after, so a
  crash in between leaves no stamp and the next run recomputes.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import polars as pl

from lkg_pipeline.core.data.sources import sha256_of
from lkg_pipeline.core.io.storage import replace_atomically

# The libraries whose versions decide a stage's numbers (dagster: it serialises the metadata a
# stamp keeps): an upgrade invalidates every stamp.
VERSIONED = ("torch", "transformers", "peft", "accelerate", "polars", "duckdb", "dagster")


def folder_digest(path: Path) -> str:
    """Every file under `path`, by relative name and content (hidden files and folders too)."""
    return folder_digest_of(path, "*")


def frame_digest(frame: pl.DataFrame) -> str:
    """Schema and rows in order. `hash_rows` is stable within a polars version, and the
    polars version is part of every fingerprint."""
    digest = hashlib.sha256(json.dumps({k: str(v) for k, v in frame.schema.items()}).encode())
    if frame.height:
        digest.update(frame.hash_rows(seed=0).to_numpy().tobytes())
    return digest.hexdigest()


def content_digest(value: Path | pl.DataFrame | None) -> str:
    """A file, a folder or a frame; a missing path or None hashes as absent (not an error: a
    stage whose optional input is absent is a different stage, not a broken one)."""
    if isinstance(value, pl.DataFrame):
        return "frame:" + frame_digest(value)
    if value is None:
        return "absent"
    if value.is_dir():
        return "folder:" + folder_digest(value)
    if value.is_file():
        return "file:" + sha256_of(value)
    return "absent"


PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # lkg_pipeline/
CORE = "lkg_pipeline.core"


def code_closure(module: str, root: Path = PACKAGE_ROOT, core: str = CORE) -> list[Path]:
    """The source files a stage's output can depend on: its own module (`module`, e.g.
    `lkg_pipeline.defs.llm`) and every module of `core` it imports or launches (`-m`), directly
    or through other core modules, sorted.

    Why not the whole package: an editable install keeps its version number through any edit,
    so code must be hashed, but hashing every file made a docstring edit in `sensors.py`
    retrain the adapter. Other `defs` modules are not followed (what a stage takes from them is
    where files live, not what they contain); imports inside functions count. Read from the
    source (`ast`), so it needs no import and sees edits made since the process started.
    """
    package = root.name

    def file_of(name: str) -> Path | None:
        relative = name.split(".")[1:]  # without the package
        for candidate in (
            root.joinpath(*relative).with_suffix(".py"),
            root.joinpath(*relative, "__init__.py"),
        ):
            if candidate.is_file():
                return candidate
        return None

    start = file_of(module)
    assert start is not None and module.split(".")[0] == package, f"no module {module} in {root}"
    seen, todo = {start}, [start]
    while todo:
        path = todo.pop()
        stat = path.stat()
        for name in _imports_in(str(path), (stat.st_mtime_ns, stat.st_size), core):
            path = file_of(name)
            if path is not None and path not in seen:
                seen.add(path)
                todo.append(path)
    return sorted(seen)


@functools.lru_cache(maxsize=256)
def _imports_in(path: str, stamp: tuple[int, int], core: str) -> frozenset[str]:
    """The `core` modules a source file names in its imports, and those it launches: a string
    that is a core module's name (`python -m <name>` runs its `__main__`). Cached by (mtime,
    size): every asset's `code_version` walks these closures when the definitions load, and
    most of them share the same core files; an edit changes the stamp and the file is parsed
    again."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(Path(path).read_text(), filename=path)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith(core + ".") and node.value.replace(".", "").isidentifier():
                names.update((node.value, node.value + ".__main__"))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(n for n in names if n == core or n.startswith(core + "."))


def code_digest(module: str, root: Path = PACKAGE_ROOT, core: str = CORE) -> str:
    """One digest of `code_closure(module)`: file names and contents."""
    return files_digest(root, code_closure(module, root, core))


def folder_digest_of(path: Path, pattern: str) -> str:
    return files_digest(path, sorted(p for p in path.rglob(pattern) if p.is_file()))


def files_digest(root: Path, files: Iterable[Path]) -> str:
    """Each file's name relative to `root` and its content, in the order given."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(sha256_of(file).encode())
    return digest.hexdigest()


def library_versions(names: Iterable[str] = VERSIONED) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def fingerprint_parts(
    stage: str,
    code_version: str | None,
    settings: Mapping[str, Any],
    inputs: Mapping[str, Path | pl.DataFrame | None],
    module: str | None = None,
) -> dict[str, str]:
    """A digest per thing a stage is made from (settings must be JSON-serialisable): kept in
    the stamp so that a recomputation can say which of them changed. `module`: the module
    that defines the stage, whose `code_digest` is part of it."""

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    return {
        "stage": digest(stage),
        "code_version": digest(code_version),
        "settings": digest(settings),
        "libraries": digest(library_versions()),
        "code": code_digest(module) if module is not None else digest(None),
        **{f"input {name}": content_digest(value) for name, value in inputs.items()},
    }


def fingerprint(
    stage: str,
    code_version: str | None,
    settings: Mapping[str, Any],
    inputs: Mapping[str, Path | pl.DataFrame | None],
    module: str | None = None,
) -> str:
    """One digest of what a stage is made from."""
    return combine(fingerprint_parts(stage, code_version, settings, inputs, module))


def combine(parts: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()


def changed_parts(stamp: Stamp | None, parts: Mapping[str, str]) -> list[str]:
    """What differs from the stamp's run: part names, or why there is nothing to compare."""
    if stamp is None:
        return ["no completed run recorded"]
    before = stamp.parts
    return sorted(k for k in set(before) | set(parts) if before.get(k) != parts.get(k))


@dataclass(frozen=True)
class Stamp:
    fingerprint: str
    outputs: dict[str, str]  # output name → content digest when the stage completed
    metadata: str  # what the stage reported, serialised by the caller
    run_id: str
    written_at: float  # Unix time
    parts: dict[str, str] = field(default_factory=dict)  # fingerprint_parts of that run


class StampStore:
    """`<root>/<stage>/<partition>.json`, one stamp per (stage, partition)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, stage: str, partition: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in partition)
        return self.root / stage / f"{safe}.json"

    def load(self, stage: str, partition: str) -> Stamp | None:
        path = self.path(stage, partition)
        try:
            return Stamp(**json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None  # absent or unreadable: recompute

    def clear(self, stage: str, partition: str) -> None:
        self.path(stage, partition).unlink(missing_ok=True)

    def save(self, stage: str, partition: str, stamp: Stamp) -> None:
        replace_atomically(
            self.path(stage, partition), lambda tmp: tmp.write_text(json.dumps(asdict(stamp)))
        )


def reusable(
    stamp: Stamp | None, fingerprint: str, outputs: Mapping[str, Path | pl.DataFrame | None]
) -> bool:
    """Whether the stamp was made from this fingerprint and every output is still as it was."""
    if stamp is None or stamp.fingerprint != fingerprint or set(stamp.outputs) != set(outputs):
        return False
    return all(
        stamp.outputs[name] == content_digest(value) != "absent" for name, value in outputs.items()
    )


def new_stamp(
    parts: Mapping[str, str], outputs: Mapping[str, Path | pl.DataFrame], metadata: str, run_id: str
) -> Stamp:
    return Stamp(
        combine(parts),
        {name: content_digest(value) for name, value in outputs.items()},
        metadata,
        run_id,
        time.time(),
        dict(parts),
    )


def describe(stamp: Stamp) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp.written_at))
    return f"run {stamp.run_id} at {when}"


def outputs_digest(stamp: Stamp) -> str:
    """One digest of everything a stage left: equal outputs, equal digest, however made."""
    return hashlib.sha256(json.dumps(stamp.outputs, sort_keys=True).encode()).hexdigest()
