"""Reusing an expensive stage's outputs when nothing it is made from changed.

The comparison itself is `lkg_pipeline.core.io.fingerprints`; `reuse_or_run` wraps it for an
asset body, which declares what its output is made from and what it leaves behind:

    return reuse_or_run(
        context, lake.path, config,
        inputs={"prompts": prompts_path, ...},   # what the output is made from
        kept={"adapter": output},                # what the last run left
        run=lambda: Made({"adapter": output}, train()),
    )

A reused materialisation still appears in the UI, with the metadata of the run that did the
work and `reused_from` naming it. Its data version is the digest of the outputs, so a reuse (or
a recomputation that lands on identical outputs) does not make anything downstream stale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from lkg_pipeline.core.io.fingerprints import (
    StampStore,
    changed_parts,
    code_digest,
    combine,
    describe,
    fingerprint_parts,
    new_stamp,
    outputs_digest,
    reusable,
)
from lkg_pipeline.defs.layout import fingerprints_dir

# Settings that change how a stage runs, never what it produces.
NOT_SETTINGS = {"recompute", "resume"}


class Recomputable(dg.Config):
    """Run configuration of a stage that reuses its outputs when nothing changed."""

    # True: run even when inputs, settings, code and outputs are as the last completed run
    # left them (e.g. to time it, or after editing code without bumping its code_version).
    recompute: bool = False


def versioned(manual: str, module: str) -> str:
    """An asset's `code_version`: the hand-kept number plus the digest of the code its output
    depends on (`core.io.fingerprints.code_closure`), so that the UI marks an asset stale exactly
    when its own code changed, as the reuse decision does; an unrelated edit changes neither."""
    return f"{manual}+{code_digest(module)[:12]}"


def stamps(lake: Path) -> StampStore:
    return StampStore(fingerprints_dir(lake))


class Reuse:
    def __init__(
        self,
        context: dg.AssetExecutionContext,
        store: StampStore,
        parts: dict[str, str],
        force: bool,
    ) -> None:
        self.context = context
        self.store = store
        self.parts = parts
        self.fingerprint = combine(parts)
        self.force = force
        self.stage = context.asset_key.to_user_string()
        self.partition = str(context.partition_key) if context.has_partition_key else "all"
        self.data_version: dg.DataVersion | None = None

    @classmethod
    def start(
        cls,
        context: dg.AssetExecutionContext,
        lake: Path,
        config: Recomputable,
        inputs: Mapping[str, Path | pl.DataFrame | None],
    ) -> Reuse:
        settings = config.model_dump(exclude=NOT_SETTINGS)
        code_version = context.assets_def.code_versions_by_key[context.asset_key]
        stage = context.asset_key.to_user_string()
        function = getattr(context.op_def.compute_fn, "decorated_fn", None)
        module = getattr(function, "__module__", None)
        assert module is not None, f"{stage}: cannot tell which module defines it"
        # the code digest read now, not at import: a long-running webserver sees edits too
        parts = fingerprint_parts(stage, code_version, settings, inputs, module)
        return cls(context, stamps(lake), parts, config.recompute)

    def previous(self, outputs: Mapping[str, Path | pl.DataFrame | None]) -> dict[str, Any] | None:
        """The last completed run's metadata, if its outputs can stand for this run's."""
        if self.force:
            return None
        stamp = self.store.load(self.stage, self.partition)
        if stamp is None or not reusable(stamp, self.fingerprint, outputs):
            why = changed_parts(stamp, self.parts) or ["its outputs were changed or removed"]
            self.context.log.info(f"{self.stage} {self.partition}: running ({', '.join(why)})")
            return None
        try:
            metadata = dg.deserialize_value(stamp.metadata, dict)
        except Exception as error:  # a stamp an older Dagster wrote: recompute, never fail
            self.context.log.info(f"{self.stage} {self.partition}: running ({error})")
            return None
        self.data_version = dg.DataVersion(outputs_digest(stamp))
        source = describe(stamp)
        self.context.log.info(
            f"{self.stage} {self.partition}: inputs, settings and code unchanged since {source}; "
            "reusing its outputs (set recompute: true to run anyway)"
        )
        return {**metadata, "reused_from": source}

    def invalidate(self) -> None:
        """Forget the last run before overwriting its outputs: a crash now leaves no stamp."""
        self.store.clear(self.stage, self.partition)

    def record(
        self, outputs: Mapping[str, Path | pl.DataFrame], metadata: Mapping[str, Any]
    ) -> dg.DataVersion:
        stamp = new_stamp(
            self.parts, outputs, dg.serialize_value(dict(metadata)), self.context.run.run_id
        )
        self.store.save(self.stage, self.partition, stamp)
        self.data_version = dg.DataVersion(outputs_digest(stamp))
        return self.data_version


@dataclass(frozen=True)
class Made:
    """What a stage's run made: the outputs its stamp digests (files, folders or frames) and
    its materialisation's metadata."""

    outputs: Mapping[str, Path | pl.DataFrame]
    metadata: Mapping[str, Any]


def reuse_or_run(
    context: dg.AssetExecutionContext,
    lake: Path,
    config: Recomputable,
    inputs: Mapping[str, Path | pl.DataFrame | None],
    kept: Mapping[str, Path | pl.DataFrame | None],
    run: Callable[[], Made],
    returns: str | None = None,
) -> dg.Output | dg.MaterializeResult:
    """The stage's result: the last completed run's, if `inputs`, settings and code are as it
    left them and its outputs (`kept`, None where absent) are intact, else `run()`'s.

    `returns` names the output handed to the IO manager (`dg.Output`); None: the stage writes
    its own files (`dg.MaterializeResult`). The last run's stamp is cleared before `run`
    starts, so a crash in it leaves nothing that could pass for a complete result.
    """
    reuse = Reuse.start(context, lake, config, inputs)
    metadata = reuse.previous(kept)
    if metadata is not None:
        outputs: Mapping[str, Path | pl.DataFrame | None] = kept
    else:
        reuse.invalidate()
        made = run()
        reuse.record(made.outputs, made.metadata)
        outputs, metadata = made.outputs, dict(made.metadata)
    if returns is None:
        return dg.MaterializeResult(metadata=metadata, data_version=reuse.data_version)
    return dg.Output(outputs[returns], metadata=metadata, data_version=reuse.data_version)
