"""CSV and TSV input: a header row names the columns, each later record is a row of strings.

Read with the csv module, record by record, from lines read with a bound (MAX_LINE_BYTES): a line past it is
skipped to its end and its record becomes an error row, as is a record the csv module refuses (a field over
its field size limit, a NUL byte) or one with more fields than the header. A record with fewer fields has the
missing columns null. Empty cells are empty strings, as the file says. A record's position is its number
(1-based, the header not counted): `rows.csv:3` is the third record.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from batchvl.config.urls import InputFile
from batchvl.io.text import Record, one_line, open_input

MAX_LINE_BYTES = 64 * 1024 * 1024
_SKIP_CHUNK = 64 * 1024


class _LongLine(Exception):
    pass


class _BoundedLines:
    """The lines of a text file for csv.reader, each read with a bound. An over-long line is skipped to its end
    and raises _LongLine once; the next call goes on with the line after it (csv.reader resets its state at each
    record it starts)."""

    def __init__(self, f):
        self.f = f

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.f.readline(MAX_LINE_BYTES + 1)
        if not line:
            raise StopIteration
        if len(line) > MAX_LINE_BYTES and not line.endswith("\n"):
            while (rest := self.f.readline(_SKIP_CHUNK)) and not rest.endswith("\n"):
                pass
            raise _LongLine
        return line


def _open(path: InputFile) -> io.TextIOWrapper:
    return io.TextIOWrapper(open_input(path), encoding="utf-8", errors="backslashreplace", newline="")


def table_header(path: InputFile, delimiter: str) -> set[str] | None:
    """The columns the header row names; None for an empty file."""
    with _open(path) as f:
        try:
            header = next(csv.reader(_BoundedLines(f), delimiter=delimiter), None)
        except (_LongLine, csv.Error):
            return set()
    return set(header) if header else None


def read_table_text(path: InputFile, name: str, delimiter: str) -> Iterator[Record]:
    """The records of a CSV (`,`) or TSV (`\\t`) file as dicts of strings, keyed by the header."""
    with _open(path) as f:
        reader = csv.reader(_BoundedLines(f), delimiter=delimiter)
        try:
            header = next(reader, None)
        except (_LongLine, csv.Error) as e:
            yield f"{name}:0", None, f"input: the header row of {name} cannot be read: {_why(e)}", None
            return
        if header is None:
            return
        number = 0
        while True:
            number += 1
            source = f"{name}:{number}"
            try:
                fields = next(reader, None)
            except (_LongLine, csv.Error) as e:
                yield source, None, f"input: record {source} cannot be read: {_why(e)}", None
                continue
            if fields is None:
                return
            if not fields:  # a blank line is no record
                number -= 1
                continue
            if len(fields) > len(header):
                yield source, None, (f"input: record {source} has {len(fields)} fields, more than the header's "
                                     f"{len(header)}"), None
                continue
            yield source, dict(zip(header, fields + [None] * (len(header) - len(fields)), strict=True)), None, None


def _why(e: BaseException) -> str:
    return f"a line longer than {MAX_LINE_BYTES} bytes (MAX_LINE_BYTES)" if isinstance(e, _LongLine) else one_line(e)
