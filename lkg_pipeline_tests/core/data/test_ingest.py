import functools
import gzip
import http.server
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from lkg_pipeline.core.data import sources
from lkg_pipeline.core.data.ingest import (
    CatalogueMismatchError,
    raw_schemas,
    read_amazon_meta,
    read_dataset,
)
from lkg_pipeline.core.data.parsing import CorruptFileError, EmptyInputError, MalformedInputError
from lkg_pipeline.core.data.sources import (
    FolderTree,
    RawFile,
    SourceTree,
    SourceUnavailableError,
    ZipTree,
    resolve_source,
)
from lkg_pipeline.defs.layout import cache_dir, sources_dir

U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "2|Misérables, Les (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0\n"
    "3|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
)
U_DATA = "1\t1\t5\t100\n1\t2\t4\t101\n2\t1\t3\t102\n"
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n"


def resolve_in(lake: Path, dataset: str, source: str) -> SourceTree:
    """`resolve_source` with a lake's drop folder and cache, as `raw_tables` calls it."""
    return resolve_source(dataset, source, sources_dir(lake, dataset), cache_dir(lake))


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


RECBOLE_HEADERS = {
    "inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
    "user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
    "link": "item_id:token\tentity_id:token",
    "kg": "head_id:token\trelation_id:token\ttail_id:token",
}


def recbole_folder(folder: Path, **rows: str) -> Path:
    """RecBole's ml-100k atomic files (`inter=...` rows after each typed header; one user)."""
    folder.mkdir()
    rows = {"user": "1\t24\tM\ttechnician\t85711\n", **rows}
    for suffix, header in RECBOLE_HEADERS.items():
        (folder / f"ml-100k.{suffix}").write_text(f"{header}\n{rows.get(suffix, '')}")
    return folder


def test_recbole_layout_keeps_kg_files(tmp_path: Path) -> None:
    d = recbole_folder(
        tmp_path / "rb",
        inter="1\t1\t5\t881250949\n",
        item="1\tToy Story\t1995\tAnimation Children's Comedy\n267\tunkonwn\tunkonwn\tunknown\n",
        link="1\tm.0dyb1\n",
        kg="m.0dyb1\tfilm.film.directed_by\tm.0jw67\n",
    )
    raw = read_dataset("ml-100k", FolderTree(d))
    assert raw.layout == "recbole"
    assert raw.frames["items"]["year"].to_list() == [1995, None]
    # Without a movie list the links (MovieLens movieIds, not ML-100K ids) are set aside.
    assert raw.frames["entity_links"].is_empty() and "set aside" in raw.notes[0]
    assert raw.frames["entity_triples"].rows() == [("m.0dyb1", "film.film.directed_by", "m.0jw67")]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("movies.dat", "1::Toy Story (1995)::Animation\n296::Pulp Fiction (1994)::Crime\n"),
        (
            "movies.csv",
            "movieId,title,genres\n1,Toy Story (1995),Animation\n"
            '296,Pulp Fiction (1994),Crime\n1089,"Usual Suspects, The (1995)",Crime\n',
        ),
    ],
)
def test_recbole_links_are_mapped_to_ml100k_items_through_a_movie_list(
    tmp_path: Path, name: str, text: str
) -> None:
    """RecBole's ml-100k.link keys films by MovieLens movieId: 296 is Pulp Fiction there and
    in ML-1M, 56 in ML-100K; read as ML-100K ids the fact would land on another film."""
    d = recbole_folder(
        tmp_path / "rb",
        inter="1\t56\t5\t881250949\n",
        item="1\tToy Story\t1995\tAnimation\n56\tPulp Fiction\t1994\tCrime\n"
        "12\tUsual Suspects, The\t1995\tCrime\n296\tPromesse, La\t1996\tDrama\n",
        link="1\tm.0dyb1\n296\tm.0f4_l\n1089\tm.suspects\n7\tm.x\n",
    )
    (d / name).write_text(text, encoding="latin-1")
    raw = read_dataset("ml-100k", FolderTree(d))
    expected = [(1, "m.0dyb1"), (56, "m.0f4_l")]  # Pulp Fiction's MID on Pulp Fiction
    if name == "movies.csv":
        expected.insert(1, (12, "m.suspects"))  # the article moved on both sides
    assert raw.frames["entity_links"].rows() == expected
    assert f"{len(expected)} of 4 links mapped" in raw.notes[0] and name in raw.notes[0]


ML_1M_MOVIES = "1::Toy Story (1995)::Animation\n296::Pulp Fiction (1994)::Crime\n"


def pulp_fiction_folder(tmp_path: Path) -> Path:
    """RecBole files whose link names Pulp Fiction by its MovieLens movieId (296), without a
    movie list beside them."""
    return recbole_folder(
        tmp_path / "rb",
        inter="1\t56\t5\t881250949\n",
        item="1\tToy Story\t1995\tAnimation\n56\tPulp Fiction\t1994\tCrime\n",
        link="296\tm.0f4_l\n",
        kg="m.0f4_l\tfilm.film.directed_by\tm.0693l\n",
    )


def test_a_movie_list_named_in_the_config_maps_the_links(
    tmp_path: Path, http_folder: tuple[Path, str]
) -> None:
    """`movie_list`: GroupLens' ml-1m.zip (here a small one), a local file, or a URL."""
    rb = pulp_fiction_folder(tmp_path)
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ml-1m/movies.dat", ML_1M_MOVIES.encode("latin-1"))
        z.writestr("ml-1m/ratings.dat", "1::1::5::978300760\n")
    served, base = http_folder
    (served / "movies.csv").write_text("movieId,title,genres\n296,Pulp Fiction (1994),Crime\n")
    lake = tmp_path / "lake"
    for spec in (str(archive), f"{base}/movies.csv"):
        movie_list = sources.resolve_movie_list(spec, cache_dir(lake))
        raw = read_dataset("ml-100k", FolderTree(rb), movie_list=movie_list)
        assert raw.frames["entity_links"].rows() == [(56, "m.0f4_l")], spec
        assert "1 of 1 links mapped" in raw.notes[0]
    assert list((cache_dir(lake) / "movie-lists").rglob("movies.csv"))  # fetched once, kept
    # Named, the list must be there: a file of another name, or a folder without one, fails.
    (tmp_path / "films.dat").write_text(ML_1M_MOVIES)
    (tmp_path / "empty").mkdir()
    for wrong in (tmp_path / "films.dat", tmp_path / "empty"):
        with pytest.raises(SourceUnavailableError, match="holds no MovieLens movie list"):
            read_dataset(
                "ml-100k",
                FolderTree(rb),
                movie_list=sources.resolve_movie_list(str(wrong), cache_dir(lake)),
            )
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        sources.resolve_movie_list(str(tmp_path / "nowhere.dat"), cache_dir(lake))
    with pytest.raises(ValueError, match="movie_list is for ml-100k"):
        read_dataset("ml-latest-small", FolderTree(rb), movie_list=FolderTree(tmp_path))
    grouplens = read_dataset(
        "ml-100k", FolderTree(write_grouplens(tmp_path / "gl")), movie_list=ZipTree(archive)
    )
    assert "is not used" in grouplens.notes[-1]


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


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ("'salesRank': {'Beauty': 1e400}", "bad field value"),  # inf: int() overflows
        ("'salesRank': {'Beauty': 10000000000000000000}", "does not fit a 64-bit integer"),
        (f"'price': 1{'0' * 400}", "bad field value"),  # float() overflows
        ("'price': 1e400", "not a finite number"),
        ("'categories': ['Beauty', 'Skin Care']", "not a list of category paths"),
        ("'related': {'also_bought': 'B002'}", "also_bought is not a list of ASINs"),
    ],
)
def test_meta_values_that_do_not_fit_are_an_issue_on_their_line(fields: str, reason: str) -> None:
    """Each used to crash without file or line, or be read letter by letter."""
    lines = ["{'asin': 'B0', 'title': 'Soap'}", f"{{'asin': 'B1', 'title': 'Lotion', {fields}}}"]
    data = gzip.compress("\n".join(lines).encode())
    with pytest.raises(MalformedInputError, match=rf"m.gz: 1 malformed line.*line 2: .*{reason}"):
        read_amazon_meta(RawFile("m.gz", data))
    frame, report = read_amazon_meta(RawFile("m.gz", data), max_bad_lines=1)
    assert frame["item_id"].to_list() == ["B0"] and [i.line for i in report.issues] == [2]


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
    tree = resolve_in(lake, "ml-100k", "default")
    assert read_dataset("ml-100k", tree).layout == "grouplens"


def test_unreachable_download_explains_what_to_provide(tmp_path: Path) -> None:
    with pytest.raises(
        SourceUnavailableError, match=r"Download of http://127.0.0.1:9/x.zip failed"
    ):
        resolve_in(tmp_path, "ml-latest-small", "http://127.0.0.1:9/x.zip")
    assert not list((tmp_path / "cache").rglob("*.part")), "a partial download was left behind"


def test_real_ml100k_from_the_recbole_wheel(recbole_wheel: Path) -> None:
    raw = read_dataset("ml-100k", ZipTree(recbole_wheel))
    sizes = {name: frame.height for name, frame in raw.frames.items()}
    assert sizes == {
        "interactions": 100_000,
        "items": 1682,
        "users": 943,
        "tags": 0,
        "entity_links": 0,  # MovieLens movieIds, set aside without a movie list to map them
        "entity_triples": 91_631,
    }
    assert raw.skipped_lines == 0


# --- sources: exactly the files named, nothing beside them (issue 16, items 2 and 7) ---------

RATINGS_CSV = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,3.5,964981247\n"
MOVIES_CSV = "movieId,title,genres\n1,Toy Story (1995),Animation\n3,Heat (1995),Crime\n"


def write_latest(folder: Path, ratings: str = RATINGS_CSV, movies: str = MOVIES_CSV) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(ratings)
    (folder / "movies.csv").write_text(movies)
    return folder


def zip_folder(folder: Path, archive: Path, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(archive, "w", compression) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"ml-latest-small/{f.name}")
    return archive


def test_truncated_zip_is_refused_and_siblings_are_never_read(tmp_path: Path) -> None:
    # A sibling folder with valid files: the old reader fell back to searching here.
    write_latest(tmp_path / "downloads" / "other")
    archive = zip_folder(write_latest(tmp_path / "src"), tmp_path / "downloads" / "latest.zip")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(
        SourceUnavailableError,
        match=r"latest.zip is a file but not a valid zip archive.*nothing beside it is searched"
        r".*ratings.csv and movies.csv",
    ):
        resolve_in(tmp_path / "lake", "ml-latest-small", str(archive))


def test_a_single_data_file_as_source_is_refused(tmp_path: Path) -> None:
    folder = write_latest(tmp_path / "latest")
    with pytest.raises(SourceUnavailableError, match=r"ratings.csv is a file but not a valid zip"):
        resolve_in(tmp_path / "lake", "ml-latest-small", str(folder / "ratings.csv"))


def test_zip_with_a_damaged_member_fails_naming_the_member(tmp_path: Path) -> None:
    archive = zip_folder(
        write_latest(tmp_path / "src"), tmp_path / "latest.zip", zipfile.ZIP_STORED
    )
    data = bytearray(archive.read_bytes())
    at = data.index(b"964982703")
    data[at] = ord("8")  # same length, wrong CRC: the directory still reads fine
    archive.write_bytes(bytes(data))
    tree = resolve_in(tmp_path / "lake", "ml-latest-small", str(archive))
    with pytest.raises(
        SourceUnavailableError,
        match=r"latest.zip!ml-latest-small/ratings.csv: the zip archive "
        r"is damaged \(BadZipFile: Bad CRC-32",
    ):
        read_dataset("ml-latest-small", tree)


def test_folder_is_searched_only_inside_itself_and_files_read_are_named(tmp_path: Path) -> None:
    write_latest(tmp_path / "b")
    (tmp_path / "a").mkdir()
    with pytest.raises(
        SourceUnavailableError, match=r"ratings.csv, movies.csv not found in .*/a\."
    ):
        read_dataset(
            "ml-latest-small", resolve_in(tmp_path, "ml-latest-small", str(tmp_path / "a"))
        )
    nested = write_latest(tmp_path / "c" / "deeper")
    raw = read_dataset(
        "ml-latest-small", resolve_in(tmp_path, "ml-latest-small", str(tmp_path / "c"))
    )
    assert raw.files_read == [str(nested / "ratings.csv"), str(nested / "movies.csv")]
    assert (raw.interactions_file, raw.items_file) == tuple(raw.files_read)


def test_missing_source_path_lists_the_expected_files_and_the_drop_folder(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    with pytest.raises(SourceUnavailableError) as err:
        resolve_in(lake, "beauty", str(tmp_path / "nowhere"))
    message = str(err.value)
    assert f"Source path {tmp_path / 'nowhere'} does not exist." in message
    assert "ratings_Beauty.csv and meta_Beauty.json.gz" in message
    assert str(lake / "sources" / "beauty") in message


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over http on localhost: (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_downloads_are_read_as_exactly_the_files_fetched(
    tmp_path: Path, http_folder: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, base = http_folder
    write_beauty(served)
    monkeypatch.setitem(
        sources.DEFAULT_URLS,
        "beauty",
        (f"{base}/ratings_Beauty.csv", f"{base}/meta_Beauty.json.gz"),
    )
    lake = tmp_path / "lake"
    stale = lake / "cache" / "beauty" / "old" / "ratings_Beauty.csv"  # not part of this source
    stale.parent.mkdir(parents=True)
    stale.write_text("X,Y,1.0,1\n")
    raw = read_dataset("beauty", resolve_in(lake, "beauty", "default"))
    assert [Path(f).name for f in raw.files_read] == ["ratings_Beauty.csv", "meta_Beauty.json.gz"]
    assert all(Path(f).is_relative_to(lake / "cache" / "beauty") for f in raw.files_read)
    assert str(stale) not in raw.files_read
    assert raw.frames["interactions"].height == 2

    # Another URL ending in the same name is fetched, not answered from the cache.
    (served / "v2").mkdir()
    write_beauty(served / "v2")
    ratings = (served / "v2" / "ratings_Beauty.csv").read_text()
    (served / "v2" / "ratings_Beauty.csv").write_text(ratings + "U9,0205616461,5.0,1400000000\n")
    monkeypatch.setitem(
        sources.DEFAULT_URLS,
        "beauty",
        (f"{base}/v2/ratings_Beauty.csv", f"{base}/v2/meta_Beauty.json.gz"),
    )
    again = read_dataset("beauty", resolve_in(lake, "beauty", "default"))
    assert again.frames["interactions"].height == 3
    assert set(again.files_read).isdisjoint(raw.files_read)

    (served / "broken.zip").write_bytes(b"<html>not found</html>")
    with pytest.raises(
        SourceUnavailableError, match=r"broken.zip \(downloaded\) is not a valid zip"
    ):
        resolve_in(lake, "beauty", f"{base}/broken.zip")


# --- empty inputs fail naming the file (issue 16, item 3) ------------------------------------


@pytest.mark.parametrize(
    ("layout", "file", "content", "why"),
    [
        ("latest", "ratings.csv", "", "no ratings: it has no data lines"),
        (
            "latest",
            "ratings.csv",
            "userId,movieId,rating,timestamp\n",
            "no ratings: it has no data",
        ),
        ("latest", "movies.csv", "", "no items: it has no data lines"),
        ("grouplens", "u.data", "", "no ratings: it has no data lines"),
        ("grouplens", "u.item", "\n\n", "no items: it has no data lines"),
        ("grouplens", "u.user", "", "no users: it has no data lines"),
        ("beauty", "ratings_Beauty.csv", "", "no ratings: it has no data lines"),
        ("beauty", "meta_Beauty.json.gz", gzip.compress(b""), "no items: it has no data lines"),
    ],
)
def test_empty_required_file_fails_naming_it(
    tmp_path: Path, layout: str, file: str, content: str | bytes, why: str
) -> None:
    folder = tmp_path / layout
    dataset = {"latest": "ml-latest-small", "grouplens": "ml-100k", "beauty": "beauty"}[layout]
    {"latest": write_latest, "grouplens": write_grouplens, "beauty": write_beauty}[layout](folder)
    path = folder / file
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(EmptyInputError, match=rf"^{re.escape(str(path))}: {why}"):
        read_dataset(dataset, FolderTree(folder))


def test_a_file_whose_every_line_was_skipped_is_empty_too(tmp_path: Path) -> None:
    folder = write_latest(tmp_path, ratings="userId,movieId,rating,timestamp\n1,1,x,1\n")
    with pytest.raises(
        EmptyInputError, match=r"ratings.csv: no ratings: all 1 data line\(s\) were malformed"
    ):
        read_dataset("ml-latest-small", FolderTree(folder), max_bad_lines=1)


# --- ratings of items missing from the catalogue (issue 16, item 5) --------------------------


def test_ratings_of_unknown_items_are_counted_and_fail_above_the_share(tmp_path: Path) -> None:
    ratings = "userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},4.0,{u * 10 + i}\n" for u in range(1, 11) for i in (1, 3)
    )
    folder = write_latest(tmp_path, ratings=ratings + "1,7,3.0,5\n1,9,3.0,6\n")  # 2 of 22
    raw = read_dataset("ml-latest-small", FolderTree(folder), max_unknown_item_share=0.1)
    assert raw.unknown_item_ratings == 2
    assert raw.frames["interactions"].height == 22  # counted here, dropped by preparation
    with pytest.raises(
        CatalogueMismatchError,
        match=rf"^{re.escape(str(folder / 'ratings.csv'))}: 2 of 22 ratings \(9.1%\) name items "
        rf"that are not in {re.escape(str(folder / 'movies.csv'))} \(e.g. item_id \[7, 9\]\), "
        r"above max_unknown_item_share=0.05",
    ):
        read_dataset("ml-latest-small", FolderTree(folder), max_unknown_item_share=0.05)
    with pytest.raises(CatalogueMismatchError, match="max_unknown_item_share=0.01"):
        read_dataset("ml-latest-small", FolderTree(folder))  # the default share


def test_a_catalogue_that_matches_has_no_unknown_items(tmp_path: Path) -> None:
    raw = read_dataset("ml-latest-small", FolderTree(write_latest(tmp_path)))
    assert raw.unknown_item_ratings == 0


# --- Amazon text (issue 16, item 4) ----------------------------------------------------------


def test_amazon_text_is_html_unescaped_and_whitespace_normalised(tmp_path: Path) -> None:
    lines = [
        "{'asin': 'B1', 'title': 'Shampoo &amp; Conditioner', 'brand': 'L&#39;Or&eacute;al', "
        "'categories': [['Beauty', 'Bath &amp; Body']]}",
        "{'asin': 'B2', 'title': '  Face Wash (Oil-Free)\\n 2 pack  '}",
        "{'asin': 'B3', 'title': 'Moisturiser, The (2014)'}",
    ]
    items, _ = read_amazon_meta(RawFile("meta", gzip.compress("\n".join(lines).encode())))
    assert items["title"].to_list() == [
        "Shampoo & Conditioner",
        "Face Wash (Oil-Free) 2 pack",
        "Moisturiser, The (2014)",  # no MovieLens rule touches an Amazon title
    ]
    assert items["brand"].to_list() == ["L'Oréal", None, None]
    assert items["categories"].to_list()[0] == [["Beauty", "Bath & Body"]]
    assert items["year"].to_list() == [None, None, None]


# --- numbers and encodings (issue 16, item 6) ------------------------------------------------


def test_timestamp_above_int64_is_a_malformed_line(tmp_path: Path) -> None:
    folder = write_grouplens(tmp_path)
    (folder / "u.data").write_text(U_DATA + "2\t2\t4\t99999999999999999999\n")
    with pytest.raises(
        MalformedInputError,
        match=r"u.data: 1 malformed line\(s\) \(line 4: column 'timestamp': cannot read "
        r"'99999999999999999999' as Int64\)",
    ):
        read_dataset("ml-100k", FolderTree(folder))
    raw = read_dataset("ml-100k", FolderTree(folder), max_bad_lines=1)
    assert raw.frames["interactions"]["timestamp"].to_list() == [100, 101, 102]


def test_utf8_bom_is_stripped_and_utf8_u_item_is_read_as_utf8(tmp_path: Path) -> None:
    folder = write_grouplens(tmp_path / "bom")
    bom = b"\xef\xbb\xbf"
    (folder / "u.data").write_bytes(bom + U_DATA.encode())
    (folder / "u.item").write_bytes(bom + U_ITEM.encode("utf-8"))
    raw = read_dataset("ml-100k", FolderTree(folder))
    assert raw.frames["interactions"]["user_id"].to_list() == [1, 1, 2]
    assert raw.frames["items"]["title"].to_list()[1] == "Misérables, Les"
    latin1 = read_dataset("ml-100k", FolderTree(write_grouplens(tmp_path / "latin1")))
    assert latin1.frames["items"]["title"].to_list()[1] == "Misérables, Les"
    encodings = {Path(r.file).name: r.encoding for r in raw.reports}
    assert encodings == {"u.data": "utf-8", "u.item": "utf-8", "u.user": "utf-8"}
    assert {Path(r.file).name: r.encoding for r in latin1.reports}["u.item"] == "latin-1"


def test_truncated_gzip_meta_fails_naming_the_file(tmp_path: Path) -> None:
    write_beauty(tmp_path)
    meta = tmp_path / "meta_Beauty.json.gz"
    meta.write_bytes(meta.read_bytes()[:-12])  # cut inside the stream
    with pytest.raises(
        CorruptFileError, match=rf"^{re.escape(str(meta))}: not a complete gzip file \(EOFError"
    ):
        read_dataset("beauty", FolderTree(tmp_path))
