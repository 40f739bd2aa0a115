"""Streaming readers for JSONL and Parquet input. Neither loads a file whole: memory stays bounded.

Nothing a record holds stops a read: a JSONL line that cannot be parsed (bad JSON, an integer past Python's
4,300 digits, nesting too deep, a line over `MAX_JSONL_LINE_BYTES`), a Parquet row group that cannot be
decoded, or a Parquet value with no Python equivalent each become that record's error row, and the records
after it are read as usual.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchvl.core import Row
from batchvl.io.ids import Ids

PARQUET_BATCH_ROWS = 1024
MAX_JSONL_LINE_BYTES = 64 * 1024 * 1024  # a longer line is skipped (never held whole) and becomes an error row
JSONL_COLUMN_SCAN = 1000  # JSONL records looked at when checking that a column exists
_SKIP_CHUNK = 64 * 1024

# (source, data, error, key): key is the id column's value when it could be read but the record could not
Record = tuple[str, dict | None, str | None, Any]


def read_rows(files: list[Path], ids: Ids) -> Iterator[tuple[Path, Row]]:
    """Yield (file, row) for every record of every file, in order, named as `ids` says.

    A record that cannot be parsed, or lacks its id, is still yielded, with `data=None` and an `error`, so it
    becomes an error row and no input row is ever lost.
    """
    for path in files:
        for row in read_file_rows(path, ids):
            yield path, row


def read_file_rows(path: Path, ids: Ids) -> Iterator[Row]:
    """The rows of one input file, as `read_rows` gives them.

    Ids and sources are valid UTF-8 (a lone surrogate, from a JSON escape or an undecodable file name, is
    written as its backslash escape), so they can be written and found again on resume."""
    name, id_column = ids.name(path), ids.column
    records = _read_jsonl(path, name) if path.suffix == ".jsonl" else _read_parquet(path, name, id_column)
    for source, data, error, key in records:
        row_id = source
        if data is not None and id_column is not None:
            key = data.get(id_column)
            if key is None:
                error = f"input: record {source} has no value in id column {id_column!r}"
                data = None
        if key is not None and id_column is not None:
            try:
                row_id = ids.text(key)
            except (ValueError, RecursionError) as e:
                row_id, data = source, None
                error = f"input: record {source}: its {id_column!r} value cannot be an id: {_one_line(e)}"
        yield Row(id=row_id, source=source, data=data, error=error)


def _one_line(error: BaseException) -> str:
    """An exception's message on one printable line, at most 500 characters."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(error)[:2000]).split())[:500]


# ---- JSONL ------------------------------------------------------------------------------------------------


def jsonl_lines(f: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) for each non-blank line of a binary file, 1-based. A line is read with a bound: one
    longer than MAX_JSONL_LINE_BYTES (its newline not counted) is skipped to its end in chunks and given as
    None, so one huge line cannot exhaust memory."""
    cap = MAX_JSONL_LINE_BYTES
    number = 0
    while True:
        line = f.readline(cap + 1)
        if not line:
            return
        number += 1
        if len(line) > cap and not line.endswith(b"\n"):
            while (rest := f.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield number, None
        elif not line.isspace():
            yield number, line


def parse_jsonl_line(line: bytes, source: str) -> tuple[dict | None, str | None]:
    """(record, None), or (None, why not): the line is not JSON, or Python cannot hold what it says (an
    integer past 4,300 digits, nesting deeper than the recursion limit), or it is not a JSON object."""
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"input: line {source} is not valid JSON: {e}"
    except (ValueError, RecursionError) as e:
        return None, f"input: line {source} cannot be read: {_one_line(e)}"
    if not isinstance(data, dict):
        return None, f"input: line {source} is a JSON {type(data).__name__}, not an object"
    return data, None


def _read_jsonl(path: Path, name: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        for number, line in jsonl_lines(f):
            source = f"{name}:{number}"
            if line is None:
                yield source, None, (f"input: line {source} is longer than {MAX_JSONL_LINE_BYTES} bytes "
                                     "(MAX_JSONL_LINE_BYTES); skipped"), None
                continue
            data, error = parse_jsonl_line(line, source)
            yield source, data, error, None


# ---- Parquet ----------------------------------------------------------------------------------------------

_READ_ERRORS = (OSError, ValueError, OverflowError, pa.ArrowException)


def _read_parquet(path: Path, name: str, id_column: str | None) -> Iterator[Record]:
    """Row group by row group: a group that cannot be decoded (a corrupt page, say) makes its rows not yet
    given error rows, keyed by their ids when the id column alone can still be read, and the next group is
    read as usual. Positions (`file:row`) come from the footer, so they stay those of an intact read."""
    file = pq.ParquetFile(path)
    start = 0
    for group in range(file.num_row_groups):
        size = file.metadata.row_group(group).num_rows
        number = start
        try:
            for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], use_threads=False):
                for data, key, error in _batch_records(batch, id_column):
                    source = f"{name}:{number}"
                    yield source, data, None if error is None else f"input: record {source} {error}", key
                    number += 1
        except _READ_ERRORS as e:
            error = (f"input: row group {group} of {name} (rows {start}-{start + size - 1}) cannot be read: "
                     f"{_one_line(e)}")
            keys = _group_ids(file, group, id_column)
            for position in range(number, start + size):
                key = keys[position - start] if keys is not None and position - start < len(keys) else None
                yield f"{name}:{position}", None, error, key
        start += size


def _group_ids(file: pq.ParquetFile, group: int, id_column: str | None) -> list[Any] | None:
    """The id column of one row group, read alone; None when it cannot be read either."""
    if id_column is None:
        return None
    try:
        return file.read_row_group(group, columns=[id_column], use_threads=False).column(0).to_pylist()
    except (*_READ_ERRORS, KeyError):
        return None


def _batch_records(batch: pa.RecordBatch, id_column: str | None) -> list[tuple[dict | None, Any, str | None]]:
    """(data, key, error) per row. A value with no Python equivalent (a timestamp past year 9999, say) makes
    its row an error, keyed by its id when that converts."""
    try:
        return [(data, None, None) for data in batch.to_pylist()]
    except _READ_ERRORS:
        pass
    records: list[tuple[dict | None, Any, str | None]] = []
    for i in range(batch.num_rows):
        data: dict[str, Any] = {}
        error = None
        for column, values in zip(batch.schema.names, batch.columns, strict=True):
            try:
                data[column] = values[i].as_py()
            except _READ_ERRORS as e:
                error = error or f"cannot be read: column {column!r}: {_one_line(e)}"
        if error is None:
            records.append((data, None, None))
        else:
            records.append((None, data.get(id_column) if id_column else None, error))
    return records


# ---- counts and columns -----------------------------------------------------------------------------------


def count_rows(files: list[Path]) -> int:
    """Rows in the input: Parquet from its footer, JSONL by a streaming count of non-blank lines."""
    total = 0
    for path in files:
        if path.suffix == ".parquet":
            total += pq.ParquetFile(path).metadata.num_rows
        else:
            with open(path, "rb") as f:
                total += sum(1 for _ in jsonl_lines(f))
    return total


def columns_of(path: Path) -> set[str] | None:
    """The columns of an input file: the Parquet schema, or the keys seen in the first JSONL_COLUMN_SCAN
    records of a JSONL file (records may omit keys; lines that cannot be parsed are passed over).

    None when the file has no records to look at.
    """
    if path.suffix == ".parquet":
        return set(pq.ParquetFile(path).schema_arrow.names)
    seen: set[str] = set()
    looked = 0
    with open(path, "rb") as f:
        for number, line in jsonl_lines(f):
            looked += 1
            if line is not None:
                record, _ = parse_jsonl_line(line, str(number))
                seen.update(record or ())
            if looked >= JSONL_COLUMN_SCAN:
                break
    return seen if looked else None
