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
import re
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

    def __init__(self, report: ParseReport, max_bad_lines: int, skippable: bool = True):
        self.report = report
        if skippable:
            advice = (
                "Fix the file, or allow skipping with the ingest config "
                f"max_bad_lines >= {len(report.issues)} (now {max_bad_lines})."
            )
        else:
            advice = (
                "The quote opened there is never closed, so the lines after it cannot be read "
                "whatever max_bad_lines allows: fix the file."
            )
        super().__init__(f"{report.summary()}. {advice}")


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
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


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
        # Only \n, \r\n and \r end a line, as in the bytes below: str.splitlines also splits
        # at U+0085 (Latin-1's byte 0x85, "…" in Windows-1252 titles), U+2028 and form feeds.
        lines = _LINE_BREAK.split(text)
        return lines[:-1] if lines[-1] == "" else lines
    encoding = report.encoding = encodings[-1]
    lines = []
    for number, chunk in enumerate(data.splitlines(), start=1):
        try:
            lines.append(chunk.decode(encoding))
        except UnicodeDecodeError as exc:
            report.issues.append(ParseIssue(number, f"not valid {encoding}: {exc.reason}"))
            lines.append("")
    return lines


class HeaderError(ValueError):
    """A first line that is not the format's header: what the file holds is not known."""


def header_order(
    label: str, lines: Sequence[str], names: Sequence[str], separator: str, quoting: int
) -> tuple[list[int], int]:
    """The field index of each of `names` in the header line `lines[0]` (case-insensitive, a
    RecBole `:type` suffix dropped), and how many fields the header has."""
    first = next(csv.reader(lines[:1], delimiter=separator, quoting=quoting), [])
    found = [field.split(":", 1)[0].strip().lower() for field in first]
    missing = [name for name in names if name.lower() not in found]
    if missing:
        shown = separator.join(first) if first else "(nothing)"
        raise HeaderError(
            f"{label}: line 1 should be the header naming the columns "
            f"{', '.join(names)}; it is {shown[:200]!r}, without {', '.join(missing)}. "
            "A file without its header line would lose its first row: add the header (or "
            "rename its columns to these names)."
        )
    return [found.index(name.lower()) for name in names], len(found)


def read_delimited(
    raw: RawFile,
    columns: Sequence[Column],
    *,
    separator: str,
    encoding: str | Sequence[str] = "utf-8",
    header: Sequence[str] = (),
    quoted: bool = False,
    extra_columns_ok: bool = False,
    max_bad_lines: int = 0,
) -> tuple[pl.DataFrame, ParseReport]:
    """A typed frame from delimited text, with the line number of every row in `LINE`.

    Wrong field counts, undecodable bytes and values that do not parse as their column's type
    are issues; rows with issues are dropped if the tolerance allows, else the whole file fails.
    `header`: the format's names of `columns` in the file's first line (RecBole's `name:type`
    is read as `name`), matched by name, so a file with its columns in another order or with
    extra ones is read right; a first line without them fails (`HeaderError`): a file without
    its header would otherwise lose its first row, one with other columns be misread.
    """
    report = ParseReport(raw.label)
    lines = decode_lines(raw, encoding, report)
    bad_lines = {i.line for i in report.issues}
    quoting = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
    width, order = len(columns), None
    if header and lines:  # an empty file is refused by the caller (EmptyInputError)
        order, width = header_order(raw.label, lines, header, separator, quoting)
        extra_columns_ok = False  # the header says how many fields a row has
    cells: list[list[str]] = [[] for _ in columns]
    numbers: list[int] = []
    position = 1 if header else 0  # lines before the reader's first
    while True:
        rows = csv.reader(lines[position:], delimiter=separator, quoting=quoting, strict=quoted)
        consumed = 0  # lines the reader has used up to the end of the last good row
        try:
            for row in rows:
                number = position + rows.line_num  # right even when a quoted field spans lines
                consumed = rows.line_num
                if not row or row == [""]:
                    report.lines_read += number in bad_lines  # undecodable lines were blanked
                    continue
                report.lines_read += 1
                if len(row) != width and not (extra_columns_ok and len(row) > width):
                    report.issues.append(
                        ParseIssue(number, f"expected {width} fields, got {len(row)}")
                    )
                    continue
                for store, value in zip(cells, row if order is None else [row[i] for i in order]):
                    store.append(value)
                numbers.append(number)
            break
        except csv.Error as exc:
            # The record that failed begins on the line after the last good one.
            issue = ParseIssue(
                position + consumed + 1, f"CSV error in the record starting here: {exc}"
            )
            report.issues.append(issue)
            if "unexpected end of data" in str(exc):
                # An unclosed quote: the reader ran on to the end of the file, so no line after
                # the record's start can be trusted, whatever max_bad_lines allows.
                raise MalformedInputError(report, max_bad_lines, skippable=False) from exc
            report.lines_read += 1  # a record-local error (`"Heat" (1995)`): skip that record
            position += rows.line_num
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
        else:  # a float: "nan", "inf" or a value beyond the type's range is not a number
            as_float = value.cast(c.dtype, strict=False)
            casts.append(pl.when(as_float.is_finite()).then(as_float).alias(c.name))
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
