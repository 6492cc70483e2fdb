"""Where the pipeline keeps what it makes: the data lake root and a Parquet IO manager."""

import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pyarrow.parquet as pq
from upath import UPath

from lkg_pipeline.core.io.storage import ParquetParts, replace_atomically, write_parquet_atomic

FILE_METADATA_PREFIX = "lkg_pipeline."
# The concurrency pool of the steps that keep every core (or a GPU) busy: the retriever's and
# the LLM's training and ranking. dagster.yaml limits it to one step at a time on the instance,
# so partitions materialised in parallel (a backfill, two `make run`s) queue there instead of
# spinning against each other on 2 cores; raise it where there are cores or GPUs to share
# (`dagster instance concurrency set torch N`; docs/operations.md#concurrency-and-the-torch-pool).
TORCH_POOL = "torch"
# The repository's data_lake/ (the package sits beside it in a checkout); LKG_DATA_LAKE moves it.
DEFAULT_LAKE = Path(__file__).resolve().parents[2] / "data_lake"


def default_lake_root() -> str:
    return os.environ.get("LKG_DATA_LAKE", str(DEFAULT_LAKE))


class DataLake(dg.ConfigurableResource):
    """The root every stage writes under; one place to point the whole pipeline elsewhere."""

    root: str = default_lake_root()

    @property
    def path(self) -> Path:
        return Path(self.root).expanduser().resolve()


class ParquetIOManager(dg.UPathIOManager):
    """Polars frames as `<root>/<group>/<asset>/<partition>.parquet`, written atomically.

    Hand-written because `dagster-polars` 0.27 still calls a polars 1.x API (shared DESIGN.md,
    known traps). A failed run leaves the previous file intact: the new one is written beside it
    and renamed over it only when complete. A table too large for memory travels in parts: an
    asset may return `ParquetParts`, concatenated into the file a row group at a time, and an
    input annotated `pl.LazyFrame` is handed over as a scan of the file, to be read in parts.
    """

    extension: str = ".parquet"

    def dump_to_path(
        self, context: dg.OutputContext, obj: pl.DataFrame | ParquetParts, path: UPath
    ) -> None:
        if not isinstance(obj, pl.DataFrame | ParquetParts):
            raise TypeError(
                f"{context.asset_key.to_user_string()}: expected a polars DataFrame or "
                f"ParquetParts, got {type(obj).__name__}"
            )
        # Output metadata under `lkg_pipeline.*` (the settings a table was made with) is also
        # written into the file, so the file says how it was made wherever it is read.
        recorded = {
            key: json.dumps(getattr(value, "value", value), sort_keys=True)
            for key, value in context.output_metadata.items()
            if key.startswith(FILE_METADATA_PREFIX)
        }
        target = Path(path.path)
        if isinstance(obj, pl.DataFrame):
            write_parquet_atomic(obj, target, recorded or None)
            return
        replace_atomically(target, lambda tmp: obj.concatenate(tmp, recorded))
        written = pq.ParquetFile(target)
        context.add_output_metadata(
            {
                "dagster/row_count": dg.MetadataValue.int(written.metadata.num_rows),
                "dagster/column_schema": dg.MetadataValue.table_schema(
                    table_schema(pl.DataFrame(schema=pl.read_parquet_schema(target)))
                ),
            }
        )

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pl.DataFrame | pl.LazyFrame:
        if _wants_lazy(context):
            return pl.scan_parquet(Path(path.path))
        return pl.read_parquet(Path(path.path))

    def get_asset_relative_path(self, context: dg.InputContext | dg.OutputContext) -> UPath:
        output = context if isinstance(context, dg.OutputContext) else context.upstream_output
        group = output.asset_spec.group_name if output is not None else None
        return UPath(group or "default", *context.asset_key.path)

    def get_metadata(self, context: dg.OutputContext, obj: Any) -> dict[str, dg.MetadataValue]:
        if not isinstance(obj, pl.DataFrame):
            return {}
        return {
            "dagster/row_count": dg.MetadataValue.int(obj.height),
            "dagster/column_schema": dg.MetadataValue.table_schema(table_schema(obj)),
        }


def _wants_lazy(context: dg.InputContext) -> bool:
    """Whether the input is annotated `pl.LazyFrame` (or `pl.LazyFrame | None`)."""
    annotation = context.dagster_type.typing_type
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return pl.LazyFrame in typing.get_args(annotation)
    return annotation is pl.LazyFrame


def table_schema(frame: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[dg.TableColumn(name, str(dtype)) for name, dtype in frame.schema.items()]
    )


@dg.definitions
def resources() -> dg.Definitions:
    lake = DataLake()
    return dg.Definitions(
        resources={
            "lake": lake,
            "io_manager": ParquetIOManager(base_path=UPath(lake.path)),
            # Runs the training script in its own process, from the repository root.
            "pipes_subprocess_client": dg.PipesSubprocessClient(cwd=str(DEFAULT_LAKE.parent)),
        }
    )
