"""Fingerprints change with every input a stage is made from, and stamps guard its outputs."""

from pathlib import Path

import polars as pl

from lkg_pipeline.core.io.fingerprints import (
    PACKAGE_ROOT,
    StampStore,
    changed_parts,
    code_closure,
    code_digest,
    combine,
    content_digest,
    fingerprint,
    new_stamp,
    outputs_digest,
    reusable,
)

PARTS = {"settings": "s", "input prompts": "p"}


def make_inputs(tmp_path: Path) -> dict:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"\x00\x01")
    (folder / "sub" / "config.json").write_text("{}")
    prompts = tmp_path / "prompts.parquet"
    pl.DataFrame({"a": [1, 2]}).write_parquet(prompts)
    return {"model": folder, "prompts": prompts, "frame": pl.DataFrame({"x": [1.0, 2.0]})}


def test_fingerprint_follows_every_input(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path)
    base = fingerprint("stage", "1", {"lr": 0.1}, inputs)
    assert fingerprint("stage", "1", {"lr": 0.1}, inputs) == base  # stable

    changed = {
        "code_version": fingerprint("stage", "2", {"lr": 0.1}, inputs),
        "settings": fingerprint("stage", "1", {"lr": 0.2}, inputs),
        "stage": fingerprint("other", "1", {"lr": 0.1}, inputs),
        "frame value": fingerprint(
            "stage", "1", {"lr": 0.1}, inputs | {"frame": pl.DataFrame({"x": [1.0, 2.5]})}
        ),
        "frame order": fingerprint(
            "stage", "1", {"lr": 0.1}, inputs | {"frame": pl.DataFrame({"x": [2.0, 1.0]})}
        ),
        "frame dtype": fingerprint(
            "stage", "1", {"lr": 0.1}, inputs | {"frame": pl.DataFrame({"x": [1, 2]})}
        ),
        "absent input": fingerprint("stage", "1", {"lr": 0.1}, inputs | {"model": None}),
    }
    (inputs["model"] / "sub" / "config.json").write_text('{"a": 1}')  # a nested file
    changed["nested file"] = fingerprint("stage", "1", {"lr": 0.1}, inputs)
    (inputs["model"] / "sub" / "config.json").write_text("{}")
    assert fingerprint("stage", "1", {"lr": 0.1}, inputs) == base  # content, not mtime
    (inputs["model"] / "sub" / "config.json").rename(inputs["model"] / "sub" / "other.json")
    changed["renamed file"] = fingerprint("stage", "1", {"lr": 0.1}, inputs)
    digests = list(changed.values())
    assert base not in digests and len(set(digests)) == len(digests), changed


def test_missing_path_and_none_are_absent(tmp_path: Path) -> None:
    assert content_digest(tmp_path / "nope") == content_digest(None) == "absent"
    assert content_digest(pl.DataFrame({"x": []})).startswith("frame:")


def test_stamp_is_reusable_only_while_outputs_are_unchanged(tmp_path: Path) -> None:
    store = StampStore(tmp_path / "stamps")
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter.bin").write_bytes(b"weights")
    table = pl.DataFrame({"rank": [1, 2, 3]})
    outputs = {"adapter": out, "table": table}
    assert store.load("lora_adapter", "ml-100k|lkg_rag") is None

    store.save("lora_adapter", "ml-100k|lkg_rag", new_stamp(PARTS, outputs, "{}", "run-1"))
    stamp = store.load("lora_adapter", "ml-100k|lkg_rag")
    assert stamp is not None and stamp.run_id == "run-1"
    assert store.path("lora_adapter", "ml-100k|lkg_rag").name == "ml-100k_lkg_rag.json"
    fp = combine(PARTS)
    assert reusable(stamp, fp, outputs)
    assert not reusable(stamp, "another fingerprint", outputs)
    assert changed_parts(stamp, PARTS | {"input prompts": "new"}) == ["input prompts"]
    assert changed_parts(None, PARTS) == ["no completed run recorded"]
    assert not reusable(stamp, fp, {"adapter": out})  # a different set of outputs
    assert not reusable(stamp, fp, outputs | {"table": table.head(2)})
    assert not reusable(stamp, fp, outputs | {"table": None})  # output file gone
    (out / "adapter.bin").write_bytes(b"tampered")
    assert not reusable(stamp, fp, outputs)

    # Equal outputs give an equal data version, however they were made.
    (out / "adapter.bin").write_bytes(b"weights")
    again = new_stamp({"settings": "other"}, outputs, "{}", "run-2")
    assert outputs_digest(again) == outputs_digest(stamp)

    store.clear("lora_adapter", "ml-100k|lkg_rag")
    assert store.load("lora_adapter", "ml-100k|lkg_rag") is None
    store.clear("lora_adapter", "ml-100k|lkg_rag")  # clearing twice is fine
    store.path("x", "p").parent.mkdir(parents=True)
    store.path("x", "p").write_text("{not json")
    assert store.load("x", "p") is None  # unreadable: recompute rather than fail


def fake_package(root: Path) -> Path:
    """pkg/defs/a.py → core.x → core.y (inside a function), and launches `-m pkg.core.job`
    (its __main__ → core.job.run); core.z and defs/b.py unrelated."""
    package = root / "pkg"
    for folder in ("core", "defs"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "defs" / "a.py").write_text(
        "from pkg.core.x import f\nfrom pkg.defs.b import g\nLAUNCH = ['-m', 'pkg.core.job']\n"
    )
    (package / "core" / "job").mkdir()
    (package / "core" / "job" / "__init__.py").write_text("")
    (package / "core" / "job" / "__main__.py").write_text("from pkg.core.job.run import main\n")
    (package / "core" / "job" / "run.py").write_text("def main():\n    pass\n")
    (package / "defs" / "b.py").write_text("from pkg.core.z import h\n")
    (package / "core" / "x.py").write_text("def f():\n    from pkg.core import y\n")
    (package / "core" / "y.py").write_text("import os\nVALUE = 1\n")
    (package / "core" / "z.py").write_text("VALUE = 2\n")
    return package


def test_a_stage_digests_its_own_module_and_the_core_code_it_imports(tmp_path: Path) -> None:
    package = fake_package(tmp_path)
    closure = code_closure("pkg.defs.a", package, "pkg.core")
    assert [p.relative_to(package).as_posix() for p in closure] == [
        "core/__init__.py",  # `from pkg.core import y` names the package too
        "core/job/__init__.py",  # launched with -m: the package, its __main__, what that runs
        "core/job/__main__.py",
        "core/job/run.py",
        "core/x.py",
        "core/y.py",
        "defs/a.py",
    ]
    before = code_digest("pkg.defs.a", package, "pkg.core")
    (package / "core" / "z.py").write_text("VALUE = 3\n")  # unrelated core code
    (package / "defs" / "b.py").write_text("from pkg.core.z import h  # edited\n")  # other defs
    assert code_digest("pkg.defs.a", package, "pkg.core") == before
    (package / "core" / "y.py").write_text("import os\nVALUE = 4\n")  # imported through x
    assert code_digest("pkg.defs.a", package, "pkg.core") != before
    before = code_digest("pkg.defs.a", package, "pkg.core")
    (package / "core" / "job" / "run.py").write_text("def main():\n    return 1\n")  # launched
    assert code_digest("pkg.defs.a", package, "pkg.core") != before


def test_the_real_stages_digest_what_they_run_and_show_it_as_their_code_version() -> None:
    from lkg_pipeline.defs.evaluate import rankings
    from lkg_pipeline.defs.llm import lora_adapter

    closure = code_closure("lkg_pipeline.defs.llm")
    names = {p.relative_to(PACKAGE_ROOT).as_posix() for p in closure}
    assert {
        "defs/llm.py",
        "core/llm/train/__main__.py",  # launched: `-m lkg_pipeline.core.llm.train`
        "core/llm/train/script.py",
        "core/llm/train/loop.py",
        "core/llm/train/data.py",
        "core/llm/train/config.py",
        "core/llm/train/checkpoints.py",
        "core/llm/segments.py",
        "core/llm/prompts.py",
    } <= names
    assert not names & {
        "defs/sensors.py",
        "defs/schedules.py",
        "core/data/ingest.py",
        "defs/evaluate.py",
    }
    (version,) = lora_adapter.code_versions_by_key.values()
    assert version == "1+" + code_digest("lkg_pipeline.defs.llm")[:12]
    (version,) = rankings.code_versions_by_key.values()
    assert version.endswith("+" + code_digest("lkg_pipeline.defs.evaluate")[:12])
    assert fingerprint("s", "1", {}, {}, "lkg_pipeline.defs.llm") != fingerprint(
        "s", "1", {}, {}, "lkg_pipeline.defs.retrieval"
    )
