import gzip
import zipfile
from pathlib import Path

import polars as pl
import pytest

from lkg_pipeline.core.ingest import raw_schemas, read_amazon_meta, read_dataset
from lkg_pipeline.core.parsing import MalformedInputError
from lkg_pipeline.core.sources import (
    FolderTree,
    RawFile,
    SourceUnavailableError,
    ZipTree,
    resolve_source,
)

U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "2|Misérables, Les (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0\n"
    "3|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
)
U_DATA = "1\t1\t5\t100\n1\t2\t4\t101\n2\t1\t3\t102\n"
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n"


def write_grouplens(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text(U_DATA)
    (folder / "u.item").write_bytes(U_ITEM.encode("latin-1"))
    (folder / "u.user").write_text(U_USER)
    return folder


def test_grouplens_ml100k_folder_and_zip_read_the_same(tmp_path: Path) -> None:
    folder = write_grouplens(tmp_path / "ml-100k")
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in folder.iterdir():
            z.write(f, f"ml-100k/{f.name}")
    a = read_dataset("ml-100k", FolderTree(tmp_path))
    b = read_dataset("ml-100k", ZipTree(archive))
    assert a.layout == b.layout == "grouplens"
    for name in a.frames:
        assert a.frames[name].equals(b.frames[name]), name
    items = a.frames["items"]
    assert items["title"].to_list() == ["Toy Story", "Misérables, Les", "unknown"]
    assert items["year"].to_list() == [1995, 1995, None]
    assert items["genres"].to_list() == [
        ["Animation", "Children's", "Comedy"],
        ["Drama", "Musical"],
        ["unknown"],
    ]
    assert a.frames["interactions"].schema == raw_schemas(pl.Int64)["interactions"]
    assert a.frames["users"]["occupation"].to_list() == ["technician", "other"]


def test_recbole_layout_keeps_kg_files(tmp_path: Path) -> None:
    d = tmp_path / "rb"
    d.mkdir()
    (d / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t881250949\n"
    )
    (d / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n267\tunkonwn\tunkonwn\tunknown\n"
    )
    (d / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n"
    )
    (d / "ml-100k.link").write_text("item_id:token\tentity_id:token\n1\tm.0dyb1\n")
    (d / "ml-100k.kg").write_text(
        "head_id:token\trelation_id:token\ttail_id:token\nm.0dyb1\tfilm.film.directed_by\tm.0jw67\n"
    )
    raw = read_dataset("ml-100k", FolderTree(d))
    assert raw.layout == "recbole"
    assert raw.frames["items"]["year"].to_list() == [1995, None]
    assert raw.frames["entity_links"].rows() == [(1, "m.0dyb1")]
    assert raw.frames["entity_triples"].rows() == [("m.0dyb1", "film.film.directed_by", "m.0jw67")]


def test_ml_latest_small_csv_with_tags(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,3.5,964981247\n"
    )
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n"
        '3,"American President, The (1995)",Comedy|Drama|Romance\n'
        "4,Babylon 5,(no genres listed)\n"
    )
    (tmp_path / "tags.csv").write_text("userId,movieId,tag,timestamp\n2,1,pixar,1445714994\n")
    raw = read_dataset("ml-latest-small", FolderTree(tmp_path))
    inter, items = raw.frames["interactions"], raw.frames["items"]
    assert inter["rating"].to_list() == [4.0, 3.5]
    assert items["title"].to_list() == ["Toy Story", "American President, The", "Babylon 5"]
    assert items["year"].to_list() == [1995, 1995, None]
    assert items["genres"].to_list() == [
        ["Adventure", "Animation"],
        ["Comedy", "Drama", "Romance"],
        [],
    ]
    assert raw.frames["tags"].rows() == [(2, 1, "pixar", 1445714994)]


def beauty_meta_lines() -> list[str]:
    return [
        "{'asin': '0205616461', 'title': 'Bio-Active Anti-Aging Serum', 'brand': 'Bio-Active', "
        "'categories': [['Beauty', 'Skin Care', 'Face']], "
        "'related': {'also_bought': ['B01', 'B02'], 'bought_together': ['B01']}, "
        "'salesRank': {'Beauty': 402875}, 'price': 12.5}",
        "{'asin': 'B01', 'title': 'Lip Balm', 'categories': [['Beauty']], 'related': {}}",
    ]


def write_beauty(folder: Path, extra_meta: list[str] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings_Beauty.csv").write_text(
        "A39HTATAQ9V7YF,0205616461,5.0,1369699200\nA3JM6GV9MNOF9X,B01,3.0,1355443200\n"
    )
    meta = "\n".join([*beauty_meta_lines(), *extra_meta]) + "\n"
    (folder / "meta_Beauty.json.gz").write_bytes(gzip.compress(meta.encode()))


def test_beauty_ratings_and_python_literal_meta(tmp_path: Path) -> None:
    write_beauty(tmp_path)
    raw = read_dataset("beauty", FolderTree(tmp_path))
    assert raw.frames["interactions"].schema["user_id"] == pl.String
    assert raw.frames["interactions"].rows()[0] == ("A39HTATAQ9V7YF", "0205616461", 5.0, 1369699200)
    item = raw.frames["items"].row(0, named=True)
    assert item["brand"] == "Bio-Active" and item["categories"] == [["Beauty", "Skin Care", "Face"]]
    assert item["also_bought"] == ["B01", "B02"] and item["bought_together"] == ["B01"]
    assert item["also_viewed"] == []
    assert (item["sales_rank_category"], item["sales_rank"], item["price"]) == (
        "Beauty",
        402875,
        12.5,
    )


def test_malicious_meta_line_fails_strict_and_is_skipped_when_tolerated(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"{{'asin': 'B9', 'title': __import__('os').system('touch {marker}')}}"
    write_beauty(tmp_path / "b", [evil])
    with pytest.raises(MalformedInputError, match=r"meta_Beauty.json.gz: 1 malformed line.*line 3"):
        read_dataset("beauty", FolderTree(tmp_path / "b"))
    raw = read_dataset("beauty", FolderTree(tmp_path / "b"), max_bad_lines=1)
    assert raw.frames["items"]["item_id"].to_list() == ["0205616461", "B01"]
    assert raw.skipped_lines == 1
    assert not marker.exists()


def test_meta_with_wrong_field_types_is_an_issue() -> None:
    data = gzip.compress(b"{'asin': 'B1', 'related': ['x'], 'title': 'T'}\n")
    with pytest.raises(MalformedInputError, match="wrong type"):
        read_amazon_meta(RawFile("m.gz", data))


def test_missing_files_say_what_to_provide(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(
        SourceUnavailableError, match=r"movies.csv not found in .*Expected ratings.csv"
    ):
        read_dataset("ml-latest-small", FolderTree(tmp_path))
    with pytest.raises(SourceUnavailableError, match="RecBole layout .* or GroupLens layout"):
        read_dataset("ml-100k", FolderTree(tmp_path))


def test_default_source_prefers_the_drop_folder(tmp_path: Path, lake: Path) -> None:
    write_grouplens(lake / "sources" / "ml-100k")
    tree = resolve_source("ml-100k", "default", lake)
    assert read_dataset("ml-100k", tree).layout == "grouplens"


def test_unreachable_download_explains_what_to_provide(tmp_path: Path) -> None:
    with pytest.raises(
        SourceUnavailableError, match=r"Download of http://127.0.0.1:9/x.zip failed"
    ):
        resolve_source("ml-latest-small", "http://127.0.0.1:9/x.zip", tmp_path)
    assert not list((tmp_path / "cache").rglob("*.part")), "a partial download was left behind"


def test_real_ml100k_from_the_recbole_wheel(recbole_wheel: Path) -> None:
    raw = read_dataset("ml-100k", ZipTree(recbole_wheel))
    sizes = {name: frame.height for name, frame in raw.frames.items()}
    assert sizes == {
        "interactions": 100_000,
        "items": 1682,
        "users": 943,
        "tags": 0,
        "entity_links": 1598,
        "entity_triples": 91_631,
    }
    assert raw.skipped_lines == 0
