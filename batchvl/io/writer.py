"""The Parquet output: a folder of part files that reads as one dataset in pyarrow, pandas and DuckDB.

Each part is written under a hidden temporary name, flushed to disk, then renamed into place, so a reader
never sees a half-written file. Rows already present are found again by reading the `id` column of the
parts, which is how a rerun skips them.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchvl.core import Result

PART_GLOB = "part-*.parquet"
TMP_PREFIX = ".tmp-part-"

BASE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("text", pa.string()),
    ("error", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("output_tokens", pa.int32()),
])


def output_schema(keep_types: dict[str, pa.DataType]) -> pa.Schema:
    schema = BASE_SCHEMA
    for name, type_ in keep_types.items():
        if name in schema.names:
            raise ValueError(f"output.keep_columns: {name!r} clashes with an output column")
        schema = schema.append(pa.field(name, type_))
    return schema


def part_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob(PART_GLOB)) if out_dir.is_dir() else []


def done_ids(out_dir: Path) -> set[str]:
    """Ids of every row already committed to the output folder."""
    ids: set[str] = set()
    for part in part_files(out_dir):
        ids.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def clear_output(out_dir: Path) -> int:
    """Remove batchvl's part files (committed and temporary) and nothing else. Returns how many."""
    removed = 0
    for path in [*part_files(out_dir), *out_dir.glob(TMP_PREFIX + "*")] if out_dir.is_dir() else []:
        path.unlink()
        removed += 1
    return removed


def jsonish(value: Any) -> str | None:
    """A JSONL keep-column value as a string: strings as they are, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


class PartWriter:
    """Buffers results and commits them as part files of at most `rows_per_file` rows."""

    def __init__(self, out_dir: Path, schema: pa.Schema, rows_per_file: int):
        self.out_dir = out_dir
        self.schema = schema
        self.rows_per_file = rows_per_file
        self._rows: list[Result] = []
        self._run = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        self.rows_written = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, result: Result) -> None:
        self._rows.append(result)
        if len(self._rows) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        table = self._to_table(self._rows)
        name = f"part-{self._run}-{self._seq:05d}.parquet"
        tmp = self.out_dir / f"{TMP_PREFIX}{name}"
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out_dir / name)
        _fsync_dir(self.out_dir)
        self._seq += 1
        self.rows_written += len(self._rows)
        self._rows = []

    def close(self) -> None:
        self.flush()

    def _to_table(self, rows: list[Result]) -> pa.Table:
        columns: dict[str, list[Any]] = {
            "id": [r.id for r in rows],
            "text": [r.text for r in rows],
            "error": [r.error for r in rows],
            "finish_reason": [r.finish_reason for r in rows],
            "prompt_tokens": [r.prompt_tokens for r in rows],
            "output_tokens": [r.output_tokens for r in rows],
        }
        for name in self.schema.names[len(BASE_SCHEMA):]:
            columns[name] = [r.keep.get(name) for r in rows]
        return pa.Table.from_pydict(columns, schema=self.schema)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
