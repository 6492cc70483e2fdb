"""Strict, line-accounted parsing of delimited text and Python-literal lines.

Raw recommendation dumps are old and hand-edited: Latin-1 titles, ragged rows, "5.0" where an
integer is meant, Python dict literals instead of JSON. Every reader here reports each line it
could not use with file and line number, and refuses the file unless the caller allowed that
many bad lines, so that a silent partial ingest cannot happen.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from lkg_pipeline.core.data.sources import RawFile

LINE = "__line"  # column carrying each row's 1-based line number in its file


@dataclass(frozen=True)
class ParseIssue:
    line: int
    reason: str


@dataclass
class ParseReport:
    """What happened to each line of one file."""

    file: str
    lines_read: int = 0
    rows_kept: int = 0
    issues: list[ParseIssue] = field(default_factory=list)
    encoding: str = ""  # the text encoding the file was read with (when one was detected)

    def summary(self, shown: int = 5) -> str:
        head = "; ".join(f"line {i.line}: {i.reason}" for i in self.issues[:shown])
        more = f"; … {len(self.issues) - shown} more" if len(self.issues) > shown else ""
        return f"{self.file}: {len(self.issues)} malformed line(s) ({head}{more})"


class MalformedInputError(ValueError):
    """More bad lines than the configured tolerance; the message lists where they are."""

    def __init__(self, report: ParseReport, max_bad_lines: int):
        self.report = report
        super().__init__(
            f"{report.summary()}. Fix the file, or allow skipping with the ingest config "
            f"max_bad_lines >= {len(report.issues)} (now {max_bad_lines})."
        )


class EmptyInputError(ValueError):
    """A file that must hold data holds none: refused before anything is written, because an
    empty table would replace good outputs and make every later check pass vacuously."""

    def __init__(self, report: ParseReport, what: str):
        self.report = report
        if report.lines_read == 0:
            why = "it has no data lines (empty, or a header only)"
        else:
            why = f"all {report.lines_read} data line(s) were malformed and skipped"
        super().__init__(f"{report.file}: no {what}: {why}.")


@dataclass(frozen=True)
class Column:
    """One field of a delimited file: its name in the output and its type."""

    name: str
    dtype: pl.DataType
    required: bool = True  # an empty value is a malformed line, not a null


UTF8_BOM = b"\xef\xbb\xbf"


class CorruptFileError(ValueError):
    """A file that cannot be read at all (a truncated archive): no line of it can be trusted."""


def decode_lines(raw: RawFile, encoding: str | Sequence[str], report: ParseReport) -> list[str]:
    """The file's lines as text; an undecodable line becomes an issue and an empty line.

    Several encodings are tried in order on the whole file and the first that decodes it wins
    (recorded in `report.encoding`): ("utf-8", "latin-1") reads a file re-saved as UTF-8 as
    UTF-8, where Latin-1 alone would silently turn "é" into "Ã©". A UTF-8 byte-order mark, which
    editors on Windows add, is not data and is dropped.
    """
    data = raw.data.removeprefix(UTF8_BOM)
    encodings = [encoding] if isinstance(encoding, str) else list(encoding)
    for candidate in encodings:
        try:
            text = data.decode(candidate)
        except UnicodeDecodeError:
            continue
        report.encoding = candidate
        return text.splitlines()
    encoding = report.encoding = encodings[-1]
    lines = []
    for number, chunk in enumerate(data.splitlines(), start=1):
        try:
            lines.append(chunk.decode(encoding))
        except UnicodeDecodeError as exc:
            report.issues.append(ParseIssue(number, f"not valid {encoding}: {exc.reason}"))
            lines.append("")
    return lines


def read_delimited(
    raw: RawFile,
    columns: Sequence[Column],
    *,
    separator: str,
    encoding: str | Sequence[str] = "utf-8",
    header: bool = False,
    quoted: bool = False,
    extra_columns_ok: bool = False,
    max_bad_lines: int = 0,
) -> tuple[pl.DataFrame, ParseReport]:
    """A typed frame from delimited text, with the line number of every row in `LINE`.

    Wrong field counts, undecodable bytes and values that do not parse as their column's type
    are issues; rows with issues are dropped if the tolerance allows, else the whole file fails.
    The header, when present, is skipped, not trusted: the column order is the format's.
    """
    report = ParseReport(raw.label)
    lines = decode_lines(raw, encoding, report)
    bad_lines = {i.line for i in report.issues}
    quoting = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
    width = len(columns)
    cells: list[list[str]] = [[] for _ in range(width)]
    numbers: list[int] = []
    start = 2 if header else 1
    rows = csv.reader(lines[start - 1 :], delimiter=separator, quoting=quoting, strict=quoted)
    consumed = 0  # physical lines the reader has used up to the end of the last good row
    try:
        for row in rows:
            number = start - 1 + rows.line_num  # right even when a quoted field spans lines
            consumed = rows.line_num
            if not row or row == [""]:
                report.lines_read += number in bad_lines  # undecodable lines were blanked
                continue
            report.lines_read += 1
            if len(row) != width and not (extra_columns_ok and len(row) > width):
                report.issues.append(ParseIssue(number, f"expected {width} fields, got {len(row)}"))
                continue
            for store, value in zip(cells, row):
                store.append(value)
            numbers.append(number)
    except csv.Error as exc:  # an unterminated quote: nothing after it can be trusted
        # The record that failed begins on the line after the last good one; an unclosed quote
        # makes the reader run on to the end of the file, which is not where the damage is.
        report.issues.append(
            ParseIssue(start + consumed, f"CSV error in the record starting here: {exc}")
        )
        raise MalformedInputError(report, max_bad_lines) from exc
    text = pl.DataFrame(
        {c.name: store for c, store in zip(columns, cells)} | {LINE: numbers},
        schema={c.name: pl.String for c in columns} | {LINE: pl.Int64},
    )
    frame = _typed(text, columns, report)
    return _enforce(frame, report, max_bad_lines)


def _typed(text: pl.DataFrame, columns: Sequence[Column], report: ParseReport) -> pl.DataFrame:
    """Cast each column, turning every value that fails into an issue on its line."""
    casts = []
    for c in columns:
        value = pl.col(c.name).str.strip_chars()
        if c.dtype == pl.String:
            casts.append(value.alias(c.name))
        elif c.dtype.is_integer():
            # "881250949.0" is an integer written by a float-minded exporter; "3.5" is not.
            as_float = value.cast(pl.Float64, strict=False)
            # Non-strict: an integral float beyond the type's range is a bad value on its line.
            integral = pl.when(as_float == as_float.floor()).then(
                as_float.cast(c.dtype, strict=False)
            )
            casts.append(pl.coalesce(value.cast(c.dtype, strict=False), integral).alias(c.name))
        else:
            casts.append(value.cast(c.dtype, strict=False).alias(c.name))
    typed = text.select(*casts, LINE)
    problems = []
    for c in columns:
        empty = text[c.name].str.strip_chars() == ""
        failed = typed[c.name].is_null() & ~empty
        if c.required:
            failed = failed | empty
        if failed.any():
            bad = pl.DataFrame({LINE: typed[LINE], "v": text[c.name]}).filter(failed)
            for number, value in bad.iter_rows():
                problems.append(
                    ParseIssue(number, f"column {c.name!r}: cannot read {value!r} as {c.dtype}")
                )
    if problems:
        report.issues.extend(problems)
        typed = typed.filter(~pl.col(LINE).is_in([p.line for p in problems]))
    # Optional empty strings are missing values, not text.
    return typed.with_columns(
        pl.col(c.name).replace("", None) for c in columns if c.dtype == pl.String
    )


def _enforce(
    frame: pl.DataFrame, report: ParseReport, max_bad_lines: int
) -> tuple[pl.DataFrame, ParseReport]:
    report.issues.sort(key=lambda i: i.line)
    if len(report.issues) > max_bad_lines:
        raise MalformedInputError(report, max_bad_lines)
    report.rows_kept = frame.height
    return frame, report


def iter_literal_lines(raw: RawFile, report: ParseReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each line of a (gzipped) file of JSON or Python dict literals.

    Amazon's 2014 metadata is written with Python's repr, so JSON fails on most lines. It is
    read with `ast.literal_eval`, which accepts only literals: a line holding a function call
    is an issue, never executed (the reference implementation calls `eval` here).
    """
    try:
        data = gzip.decompress(raw.data) if raw.data[:2] == b"\x1f\x8b" else raw.data
    except (EOFError, OSError, zlib.error) as exc:
        raise CorruptFileError(
            f"{raw.label}: not a complete gzip file "
            f"({type(exc).__name__}: {exc or 'it ends early'}); the download was probably cut "
            "short: fetch it again."
        ) from exc
    report.encoding = "utf-8"
    for number, chunk in enumerate(io.BytesIO(data.removeprefix(UTF8_BOM)), start=1):
        report.lines_read += 1
        try:
            text = chunk.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            report.issues.append(ParseIssue(number, f"not valid utf-8: {exc.reason}"))
            continue
        if not text:
            report.lines_read -= 1
            continue
        try:
            record = json.loads(text)
        except ValueError:
            try:
                record = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
                reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
                report.issues.append(ParseIssue(number, f"not a literal ({reason[:120]})"))
                continue
        if not isinstance(record, dict):
            report.issues.append(
                ParseIssue(number, f"expected a dict, got {type(record).__name__}")
            )
            continue
        yield number, record
