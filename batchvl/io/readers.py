"""Streaming readers for JSONL and Parquet input. Neither loads a file whole: memory stays bounded."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from batchvl.core import Row

PARQUET_BATCH_ROWS = 1024


def row_key_names(files: list[Path]) -> dict[Path, str]:
    """Short, stable names for input files, used in default row ids: the path below their common folder."""
    if len(files) == 1:
        return {files[0]: files[0].name}
    root = os.path.commonpath([str(f.parent) for f in files])
    return {f: os.path.relpath(f, root) for f in files}


def read_rows(files: list[Path], id_column: str | None = None) -> Iterator[tuple[Path, Row]]:
    """Yield (file, row) for every record of every file, in order.

    A record that cannot be parsed, or lacks its id, is still yielded, with `data=None` and an `error`, so it
    becomes an error row and no input row is ever lost.
    """
    names = row_key_names(files)
    for path in files:
        for row in read_file_rows(path, names[path], id_column):
            yield path, row


def read_file_rows(path: Path, name: str, id_column: str | None = None) -> Iterator[Row]:
    """The rows of one input file, as `read_rows` gives them; `name` is the file's part of the default ids."""
    reader = _read_jsonl if path.suffix == ".jsonl" else _read_parquet
    for source, data, error in reader(path, name):
        row_id = source
        if data is not None and id_column is not None:
            value = data.get(id_column)
            if value is None:
                error = f"input: record {source} has no value in id column {id_column!r}"
                data = None
            else:
                row_id = str(value)
        yield Row(id=row_id, source=source, data=data, error=error)


def _read_jsonl(path: Path, name: str) -> Iterator[tuple[str, dict | None, str | None]]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{name}:{number}"
            try:
                data = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield source, None, f"input: line {source} is not valid JSON: {e}"
                continue
            if not isinstance(data, dict):
                yield source, None, f"input: line {source} is a JSON {type(data).__name__}, not an object"
                continue
            yield source, data, None


def _read_parquet(path: Path, name: str) -> Iterator[tuple[str, dict | None, str | None]]:
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for data in batch.to_pylist():
            yield f"{name}:{number}", data, None
            number += 1


def count_rows(files: list[Path]) -> int:
    """Rows in the input: Parquet from its footer, JSONL by a streaming count of non-blank lines."""
    total = 0
    for path in files:
        if path.suffix == ".parquet":
            total += pq.ParquetFile(path).metadata.num_rows
        else:
            with open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
    return total


def columns_of(path: Path) -> set[str] | None:
    """The columns of an input file: the Parquet schema, or the keys of the first JSONL record.

    None when the file has no records to look at.
    """
    if path.suffix == ".parquet":
        return set(pq.ParquetFile(path).schema_arrow.names)
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                first: Any = json.loads(line)
                return set(first) if isinstance(first, dict) else set()
    return None
