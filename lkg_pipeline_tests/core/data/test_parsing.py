from pathlib import Path

import polars as pl
import pytest

from lkg_pipeline.core.data.parsing import (
    Column,
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
        raw("u\ti\tr\n1\t10\t4\n2\t20\t3.5\n"), COLUMNS, separator="\t", header=True
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
    frame, _ = read_delimited(raw(text), cols, separator=",", header=True, quoted=True)
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
        read_delimited(
            raw(text, "movies.csv"), MOVIE_COLUMNS, separator=",", header=True, quoted=True
        )


def test_encodings_are_tried_in_order_and_the_one_used_is_reported() -> None:
    columns = [Column("id", pl.Int64), Column("t", pl.String)]
    utf8 = "1|Misérables, Les\n".encode()
    latin1 = "1|Misérables, Les\n".encode("latin-1")
    for data, used in ((utf8, "utf-8"), (latin1, "latin-1"), (b"\xef\xbb\xbf" + utf8, "utf-8")):
        frame, report = read_delimited(
            raw(data), columns, separator="|", encoding=("utf-8", "latin-1")
        )
        assert frame["t"].to_list() == ["Misérables, Les"] and report.encoding == used
