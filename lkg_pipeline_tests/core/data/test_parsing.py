from pathlib import Path

import polars as pl
import pytest

from lkg_pipeline.core.data.parsing import (
    Column,
    HeaderError,
    MalformedInputError,
    ParseReport,
    iter_literal_lines,
    read_delimited,
)
from lkg_pipeline.core.data.sources import RawFile

COLUMNS = [Column("user", pl.Int64), Column("item", pl.Int64), Column("rating", pl.Float32)]


def raw(text: str | bytes, label: str = "f.tsv") -> RawFile:
    return RawFile(label, text.encode() if isinstance(text, str) else text)


def test_typed_columns_and_line_numbers() -> None:
    frame, report = read_delimited(
        raw("u\ti\tr\n1\t10\t4\n2\t20\t3.5\n"), COLUMNS, separator="\t", header=("u", "i", "r")
    )
    assert frame.select("user", "item", "rating").rows() == [(1, 10, 4.0), (2, 20, 3.5)]
    assert frame["__line"].to_list() == [2, 3]
    assert frame.schema["user"] == pl.Int64 and frame.schema["rating"] == pl.Float32
    assert report.lines_read == 2 and report.rows_kept == 2 and not report.issues


def test_integral_float_is_an_integer_but_a_fraction_is_not() -> None:
    text = "1\t10.0\t4\n2\t20.5\t3\n"
    with pytest.raises(MalformedInputError, match=r"line 2: column 'item': cannot read '20.5'"):
        read_delimited(raw(text), COLUMNS, separator="\t")
    frame, _ = read_delimited(raw(text), COLUMNS, separator="\t", max_bad_lines=1)
    assert frame["item"].to_list() == [10]


def test_malformed_lines_are_reported_with_file_line_and_count() -> None:
    text = "1\t10\t4\n2\t20\n3\tx\t5\n4\t40\t5\t9\n5\t50\t\n6\t60\t1\n"
    with pytest.raises(MalformedInputError) as err:
        read_delimited(raw(text, "data/u.data"), COLUMNS, separator="\t")
    message = str(err.value)
    assert "data/u.data: 4 malformed line(s)" in message
    for fragment in (
        "line 2: expected 3 fields, got 2",
        "line 3: column 'item'",
        "line 4: expected 3 fields, got 4",
        "line 5: column 'rating'",
        "max_bad_lines >= 4",
    ):
        assert fragment in message
    frame, report = read_delimited(raw(text), COLUMNS, separator="\t", max_bad_lines=4)
    assert frame["user"].to_list() == [1, 6]
    assert [i.line for i in report.issues] == [2, 3, 4, 5]
    assert report.lines_read == 6


def test_undecodable_bytes_are_an_issue_on_their_line() -> None:
    data = b"1\t10\t4\n" + b"2\t\xff\xfe\t3\n" + b"3\t30\t2\n"
    with pytest.raises(MalformedInputError, match="line 2: not valid utf-8"):
        read_delimited(raw(data), COLUMNS, separator="\t")
    frame, report = read_delimited(raw(data), COLUMNS, separator="\t", max_bad_lines=1)
    assert frame["user"].to_list() == [1, 3] and report.lines_read == 3


def test_latin1_text_decodes_to_the_same_unicode() -> None:
    data = "1|Misérables, Les (1995)\n".encode("latin-1")
    frame, _ = read_delimited(
        raw(data),
        [Column("id", pl.Int64), Column("t", pl.String)],
        separator="|",
        encoding="latin-1",
    )
    assert frame["t"].to_list() == ["Misérables, Les (1995)"]


def test_quoted_csv_keeps_commas_inside_titles() -> None:
    text = 'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama\n'
    cols = [Column("id", pl.Int64), Column("title", pl.String), Column("genres", pl.String)]
    frame, _ = read_delimited(
        raw(text), cols, separator=",", header=("movieId", "title", "genres"), quoted=True
    )
    assert frame.row(0)[:3] == (1, "American President, The (1995)", "Comedy|Drama")


def test_python_literals_are_parsed_without_executing_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    lines = [
        "{'asin': 'B1', 'title': 'Lipstick'}",
        '{"asin": "B2"}',
        f"__import__('os').system('touch {marker}')",
        "{'asin': 'B3', 'x': (lambda: 1)()}",
        "['not', 'a', 'dict']",
    ]
    report = ParseReport("meta")
    records = list(iter_literal_lines(raw("\n".join(lines)), report))
    assert [r["asin"] for _, r in records] == ["B1", "B2"]
    assert [i.line for i in report.issues] == [3, 4, 5]
    assert not marker.exists(), "a literal line was executed"


MOVIE_COLUMNS = [Column("id", pl.Int64), Column("title", pl.String), Column("genres", pl.String)]
MOVIE_HEADER = ("movieId", "title", "genres")


def read_movies(text: str, max_bad_lines: int = 0) -> tuple[pl.DataFrame, ParseReport]:
    """`text` read as GroupLens' movies.csv (quoted CSV with its header)."""
    return read_delimited(
        raw(text, "movies.csv"),
        MOVIE_COLUMNS,
        separator=",",
        header=MOVIE_HEADER,
        quoted=True,
        max_bad_lines=max_bad_lines,
    )


def test_header_columns_are_matched_by_name() -> None:
    """RecBole's typed header in another order, with an extra column: read by name."""
    text = "rating:float\tuser:token\tnote:token_seq\titem:token\n4\t1\tok\t10\n3.5\t2\t\t20\n"
    frame, report = read_delimited(
        raw(text, "x.inter"), COLUMNS, separator="\t", header=("user", "item", "rating")
    )
    assert frame.select("user", "item", "rating").rows() == [(1, 10, 4.0), (2, 20, 3.5)]
    assert frame["__line"].to_list() == [2, 3] and not report.issues


@pytest.mark.parametrize(
    ("first_line", "missing"),
    [
        ("1,10,4.0,100", "userId, movieId, rating, timestamp"),
        ("user,movieId,rating,ts", "userId, timestamp"),
    ],
)
def test_a_first_line_that_is_not_the_header_fails_naming_what_is_missing(
    first_line: str, missing: str
) -> None:
    """Without the check a headerless file lost its first rating, silently."""
    text = f"{first_line}\n1,11,4.0,101\n"
    columns = [Column(n, pl.Int64) for n in ("u", "i", "r", "t")]
    with pytest.raises(
        HeaderError, match=rf"ratings.csv: line 1 should be the header .* without {missing}\."
    ):
        read_delimited(
            raw(text, "ratings.csv"),
            columns,
            separator=",",
            header=("userId", "movieId", "rating", "timestamp"),
            quoted=True,
        )


@pytest.mark.parametrize("cut_at", [13, 3])
def test_unclosed_quote_is_reported_on_the_line_where_its_record_starts(cut_at: int) -> None:
    lines = ["movieId,title,genres"] + [f'{i},"Film {i}, The (1995)",Drama' for i in range(2, 14)]
    lines[cut_at - 1] = f'{cut_at},"Film {cut_at}, The (19'  # cut inside the quotes
    text = "\n".join(lines) + "\n"
    assert len(text.splitlines()) == 13
    with pytest.raises(
        MalformedInputError,
        match=rf"movies.csv: 1 malformed line\(s\) \(line {cut_at}: CSV error in the record "
        r"starting here: ",  # then the csv module's reason, which depends on what follows
    ):
        read_movies(text)


def test_encodings_are_tried_in_order_and_the_one_used_is_reported() -> None:
    columns = [Column("id", pl.Int64), Column("t", pl.String)]
    utf8 = "1|Misérables, Les\n".encode()
    latin1 = "1|Misérables, Les\n".encode("latin-1")
    for data, used in ((utf8, "utf-8"), (latin1, "latin-1"), (b"\xef\xbb\xbf" + utf8, "utf-8")):
        frame, report = read_delimited(
            raw(data), columns, separator="|", encoding=("utf-8", "latin-1")
        )
        assert frame["t"].to_list() == ["Misérables, Les"] and report.encoding == used


def test_non_finite_and_overflowing_ratings_are_bad_values_on_their_lines() -> None:
    text = "1\t10\tnan\n2\t20\tinf\n3\t30\t-1e39\n4\t40\t4.0\n"
    with pytest.raises(MalformedInputError) as err:
        read_delimited(raw(text), COLUMNS, separator="\t")
    assert [i.line for i in err.value.report.issues] == [1, 2, 3]
    assert "column 'rating': cannot read 'nan'" in str(err.value)
    frame, _ = read_delimited(raw(text), COLUMNS, separator="\t", max_bad_lines=3)
    assert frame["rating"].to_list() == [4.0]


@pytest.mark.parametrize("inside", ["\u2028", "\u0085", "\x0c"])
def test_only_newlines_end_a_line(inside: str) -> None:
    """str.splitlines would cut a title at U+2028, U+0085 (a Latin-1 byte 0x85) or a form feed."""
    text = f"1|Heat\n2|A{inside}B\n3|Ronin\r\n4|Fargo\r5|Clerks\n"
    columns = [Column("id", pl.Int64), Column("t", pl.String)]
    frame, report = read_delimited(raw(text.encode("utf-8")), columns, separator="|")
    assert frame["t"].to_list() == ["Heat", f"A{inside}B", "Ronin", "Fargo", "Clerks"]
    assert frame["__line"].to_list() == [1, 2, 3, 4, 5] and not report.issues


def test_a_stray_quote_is_one_skippable_bad_line() -> None:
    text = (
        'movieId,title,genres\n10,"Heat" (1995),Action\n11,Ronin (1998),Action\n'
        '12,"Fargo, (1996)",Crime\n'
    )
    with pytest.raises(
        MalformedInputError, match=r"line 2: CSV error .*max_bad_lines >= 1 \(now 0\)"
    ):
        read_movies(text)
    frame, report = read_movies(text, max_bad_lines=1)
    assert frame["id"].to_list() == [11, 12] and frame["__line"].to_list() == [3, 4]
    assert frame["title"].to_list() == ["Ronin (1998)", "Fargo, (1996)"]
    assert [i.line for i in report.issues] == [2] and report.lines_read == 3


def test_an_unclosed_quote_fails_whatever_max_bad_lines_allows() -> None:
    text = 'movieId,title,genres\n10,"Heat (1995),Action\n11,Ronin (1998),Action\n'
    with pytest.raises(MalformedInputError, match=r"line 2: CSV error .*never closed") as err:
        read_movies(text, max_bad_lines=5)
    assert "max_bad_lines >=" not in str(err.value)
