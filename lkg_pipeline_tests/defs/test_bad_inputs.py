"""Bad input through the real assets: the run fails naming the file and why, and every table a
good run stored before is left byte-identical (issue 16)."""

import gzip
import zipfile
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from lkg_pipeline.defs.ingest import raw_tables
from lkg_pipeline.defs.prepare import prepared_tables
from lkg_pipeline_tests.defs.test_assets import resources

MOVIES = "movieId,title,genres\n" + "".join(f"{i},Film {i} (199{i}),Drama\n" for i in range(6))
RATINGS_HEADER = "userId,movieId,rating,timestamp\n"
RATINGS = RATINGS_HEADER + "".join(
    f"{u},{i},3.5,{1000 + u * 10 + i}\n" for u in range(4) for i in range(6)
)
OUTPUTS = {
    "raw_interactions": "ingest",
    "raw_items": "ingest",
    "items": "prepare",
    "sequences": "prepare",
}
PREPARE = {"min_user_interactions": 3, "min_item_interactions": 1}


def run(lake: Path, source: Path) -> None:
    config = {
        "ops": {
            "raw_tables": {"config": {"source": str(source)}},
            "prepared_tables": {"config": PREPARE},
        }
    }
    dg.materialize(
        [raw_tables, prepared_tables],
        partition_key="ml-latest-small",
        run_config=config,
        resources=resources(lake),
        selection=list(OUTPUTS),
    )


def stored(lake: Path) -> dict[str, bytes]:
    return {
        name: (lake / group / name / "ml-latest-small.parquet").read_bytes()
        for name, group in OUTPUTS.items()
    }


def truncated_zip(folder: Path) -> Path:
    archive = folder.parent / "latest.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ml-latest-small/ratings.csv", RATINGS)
        z.writestr("ml-latest-small/movies.csv", MOVIES)
    archive.write_bytes(archive.read_bytes()[:-40])
    return archive


def write(name: str, text: str) -> Callable[[Path], Path]:
    def change(folder: Path) -> Path:
        (folder / name).write_text(text)
        return folder

    return change


CASES = {
    "empty ratings.csv": (write("ratings.csv", ""), r"ratings.csv: no ratings: it has no data"),
    "header-only ratings.csv": (
        write("ratings.csv", RATINGS_HEADER),
        r"ratings.csv: no ratings: it has no data",
    ),
    "empty movies.csv": (write("movies.csv", ""), r"movies.csv: no items: it has no data"),
    "ratings of another catalogue": (
        write("movies.csv", "movieId,title,genres\n0,Film 0 (1990),Drama\n"),
        r"ratings.csv: 20 of 24 ratings \(83.3%\) name items that are not in .*movies.csv",
    ),
    "timestamp beyond int64": (
        write("ratings.csv", RATINGS + "1,1,4.0,99999999999999999999\n"),
        r"ratings.csv: 1 malformed line\(s\) \(line 26: column 'timestamp'",
    ),
    "truncated zip": (truncated_zip, r"latest.zip is a file but not a valid zip archive"),
    "nothing survives the k-core": (
        write("ratings.csv", RATINGS_HEADER + "".join(f"{u},1,4.0,{u}\n" for u in range(9))),
        r"Nothing is left after the k-core \(min_user_interactions=3",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_and_keeps_every_stored_table(lake: Path, tmp_path: Path, case: str):
    src = tmp_path / "latest"
    src.mkdir()
    (src / "movies.csv").write_text(MOVIES)
    (src / "ratings.csv").write_text(RATINGS)
    run(lake, src)
    before = stored(lake)
    assert pl.read_parquet(lake / "prepare" / "sequences" / "ml-latest-small.parquet").height == 24

    change, message = CASES[case]
    source = change(src)
    with pytest.raises(Exception, match=message):
        run(lake, source)
    after = stored(lake)
    # Ingest succeeds when only the k-core empties the data: its new tables are correct ones.
    kept = ("items", "sequences") if case == "nothing survives the k-core" else OUTPUTS
    for name in kept:
        assert after[name] == before[name], f"{name} was overwritten by a failed run"


def test_beauty_titles_are_unescaped_and_kept_as_written(lake: Path, tmp_path: Path) -> None:
    titles = ["Shampoo &amp; Conditioner", "Face Wash (Oil-Free)", "Soap, The", "Cream (2014)"]
    meta = "".join(f"{{'asin': 'B{i}', 'title': {t!r}}}\n" for i, t in enumerate(titles))
    (tmp_path / "meta_Beauty.json.gz").write_bytes(gzip.compress(meta.encode()))
    (tmp_path / "ratings_Beauty.csv").write_text(
        "".join(f"U{u},B{i},5.0,{u * 10 + i}\n" for u in range(3) for i in range(4))
        + "U0,B9,4.0,99\n"  # an item the catalogue lacks: 1 of 13 ratings, under the share
    )
    config = {
        "ops": {
            "raw_tables": {"config": {"source": str(tmp_path), "max_unknown_item_share": 0.1}},
            "prepared_tables": {"config": PREPARE},
        }
    }
    result = dg.materialize(
        [raw_tables, prepared_tables],
        partition_key="beauty",
        run_config=config,
        resources=resources(lake),
        selection=["raw_interactions", "raw_items", "items", "sequences"],
    )
    assert result.success
    items = pl.read_parquet(lake / "prepare" / "items" / "beauty.parquet")
    assert items["title"].to_list() == [
        "Shampoo & Conditioner",
        "Face Wash (Oil-Free)",
        "Soap, The",
        "Cream (2014)",
    ]
    raw_meta = result.asset_materializations_for_node("raw_tables")[0].metadata
    assert raw_meta["unknown_item_ratings"].value == 1
    assert "| utf-8 |" in raw_meta["files"].value
    prepared = {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("prepared_tables")
    }
    assert prepared["items"]["title_style"].value == "amazon"
    assert prepared["sequences"]["interactions_unknown_item"].value == 1


def test_recommendations_without_the_variants_prompts_say_which_asset_to_make(tmp_path) -> None:
    """Even the retriever needs the prompts' settings for its explanations; a missing file was
    a bare polars error."""
    from lkg_pipeline.defs.evaluate import _prompts_and_reasons

    empty = pl.DataFrame()
    with pytest.raises(
        FileNotFoundError, match=r"materialise `prompts` for partition 'ml-100k\|lkg_rag'"
    ):
        _prompts_and_reasons(tmp_path, "ml-100k", "lkg_rag", empty, empty, empty)
