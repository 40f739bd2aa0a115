"""The output: a folder of part files, Parquet by default (they read as one dataset in pyarrow, pandas and
DuckDB), or JSONL lines of batchvl's columns or of OpenAI batch results (`output.format`, io.jsonl_parts).

Each part is written under a hidden temporary name, flushed to disk, then renamed into place, so a reader
never sees a half-written file. Rows already present are found again by reading the `id` column of the
parts, which is how a rerun skips them.

Besides the parts, the folder holds `_batchvl.json` (the fingerprint of the job that wrote it, see
batchvl.run.fingerprint) and `_summary.json` (counts, rewritten at each commit). Their names start with `_`, so
globs of `part-*.parquet` (and pyarrow's dataset discovery) skip them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from batchvl.core import Result, jsonish
from batchvl.errors import DamagedPartError
from batchvl.io import jsonl_parts
from batchvl.io.columns import OWN, OWN_COLUMNS, has_own, is_own, own_value
from batchvl.io.durable import Owner, fsync_dir, temp_files, write_bytes_atomic, write_table_atomic

PART_GLOB = "part-*.parquet"
PART_SUFFIXES = {"parquet": ".parquet", "jsonl": ".jsonl", "openai-batch": ".jsonl"}
FINGERPRINT_NAME = "_batchvl.json"
SUMMARY_NAME = "_summary.json"

log = logging.getLogger(__name__)

BASE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("text", pa.string()),
    ("error", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("output_tokens", pa.int32()),
])


def output_schema(keep_types: dict[str, pa.DataType], own: tuple[str, ...] = ()) -> pa.Schema:
    """BASE_SCHEMA, then the job's own columns (`own_columns`), then its keep columns."""
    schema = BASE_SCHEMA
    for name in own:
        schema = schema.append(pa.field(name, OWN_COLUMNS[name], metadata={OWN: b"1"}))
    for name, type_ in keep_types.items():
        if name in schema.names:
            raise ValueError(f"output.keep_columns: {name!r} clashes with an output column")
        schema = schema.append(pa.field(name, type_))
    return schema


def part_files(out_dir: Path) -> list[Path]:
    """The committed part files of an output folder, of any output format."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.glob("part-*") if p.suffix in (".parquet", ".jsonl"))


def part_index(part: Path) -> tuple[list[str], list[str | None], list[int] | None]:
    """The ids, errors and sample indices (None: a part without samples, generation.n 1) of a part, in order.
    DamagedPartError for a part that cannot be read whole."""
    if part.suffix == ".jsonl":
        return jsonl_parts.index(part)
    table, samples = read_part_samples(part, ["id", "error"])
    return (table.column("id").to_pylist(), table.column("error").to_pylist(),
            table.column("sample").to_pylist() if samples else None)


def part_results(part: Path) -> list[Result]:
    """The Results a part was written from (keep columns in `keep`; image counts are not written)."""
    if part.suffix == ".jsonl":
        return list(jsonl_parts.results(part))
    return table_results(read_part(part))


def check_part(part: Path) -> None:
    """Read a part whole. DamagedPartError when it cannot be."""
    if part.suffix == ".jsonl":
        jsonl_parts.index(part)
    else:
        read_part(part)


def done_ids(out_dir: Path) -> set[str]:
    """Ids of every row already committed to the output folder."""
    return read_done(out_dir).ids


def error_kind(error: str) -> str:
    """The kind of an error: the text before its first ':' (`media`, `input`, `prompt`, ...)."""
    return error.split(":", 1)[0].strip() or "unknown"


class Done(NamedTuple):
    """What an output folder holds: the ids committed, how many rows have no error, the failed ones by error
    kind, the ids of the rows whose input record could not be read (their id is the record's position,
    `file:line`), which a rerun replaces once the record reads, the id of one failed row of each kind, and
    with generation.n > 1 the (id, sample) of every row: what exactly-once is kept on then."""

    ids: set[str]
    ok: int
    failed: dict[str, int]
    unreadable: set[str]
    examples: dict[str, str]
    samples: set[tuple[str, int]]


def read_done(out_dir: Path) -> Done:
    done = Done(set(), 0, {}, set(), {}, set())
    ok = 0
    for part in part_files(out_dir):
        ids, errors, samples = part_index(part)
        done.ids.update(ids)
        if samples is not None:
            done.samples.update(zip(ids, samples, strict=True))
        for row_id, error in zip(ids, errors, strict=True):
            if error is None:
                ok += 1
                continue
            kind = error_kind(error)
            done.failed[kind] = done.failed.get(kind, 0) + 1
            done.examples.setdefault(kind, row_id)
            if error.startswith((f"input: line {row_id} ", f"input: record {row_id} ", f"input: record {row_id}:")):
                done.unreadable.add(row_id)
    return done._replace(ok=ok)


def read_part(part: Path, columns: list[str] | None = None) -> pa.Table:
    """A committed part file, read whole (or these columns). A part that cannot be read (truncated, zeroed by a
    failing disk or an interrupted copy) stops the run with one line naming it: its rows would otherwise
    silently count as not done, or the run would crash on it every time."""
    try:
        return pq.read_table(part, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise DamagedPartError(part, " ".join(str(e).split())[:160]) from None


def read_part_samples(part: Path, columns: list[str]) -> tuple[pa.Table, bool]:
    """A Parquet part's `columns`, and its own `sample` column when it has one (generation.n above 1), with
    whether it has: the file opened once, for its schema and its columns. DamagedPartError as read_part."""
    try:
        with pq.ParquetFile(part) as f:
            samples = has_own(f.schema_arrow, "sample")
            return f.read(columns=columns + ["sample"] if samples else columns), samples
    except (OSError, pa.ArrowException) as e:
        raise DamagedPartError(part, " ".join(str(e).split())[:160]) from None


def clear_output(out_dir: Path) -> int:
    """Remove batchvl's part files (committed and temporary) and its `_` files, nothing else. Returns how many
    part files."""
    removed = 0
    for path in [*part_files(out_dir), *temp_files(out_dir)]:
        path.unlink()
        removed += 1
    for name in (FINGERPRINT_NAME, SUMMARY_NAME):
        (out_dir / name).unlink(missing_ok=True)
    return removed


def drop_rows(out_dir: Path, drop, owner: Owner) -> int:
    """Rewrite every part file holding rows for which `drop(id, error)` is true without them (temp file,
    fsync, rename over the part: atomic per part; a part left empty is removed). Returns the rows dropped."""
    dropped = 0
    for part in part_files(out_dir):
        if part.suffix == ".jsonl":
            check_part(part)
            lines, gone = jsonl_parts.without(part, drop)
            if gone:
                if lines:
                    write_bytes_atomic(b"".join(lines), part, owner)
                else:
                    part.unlink()
                fsync_dir(out_dir)
                dropped += gone
            continue
        table = read_part(part)  # its schema, own columns' metadata included, is written back as it was
        keep = [not drop(i, e) for i, e in zip(table.column("id").to_pylist(), table.column("error").to_pylist(),
                                               strict=True)]
        gone = keep.count(False)
        if not gone:
            continue
        if gone == len(keep):
            part.unlink()
        else:
            write_table_atomic(table.filter(pa.array(keep)), part, owner)
        fsync_dir(out_dir)
        dropped += gone
    return dropped


class PartWriter:
    """Buffers results and commits them as part files of at most `rows_per_file` rows. `on_commit(results)` is
    called after each part is in place; `before_rename()` once a part's temporary file is written and fsynced,
    before it is renamed into place (the run's check that it still holds the folder, and the crash tests'
    `write` fault point). Part names start with the owner's run id (its start time and a random suffix), so
    writers never clash (shards, engine workers, reruns); `tag` adds a readable name to them (an engine
    worker's, `gpu1`). `format`: parquet, jsonl or openai-batch (whose lines name `model`)."""

    def __init__(self, out_dir: Path, schema: pa.Schema, rows_per_file: int, owner: Owner,
                 on_commit: Callable[[list[Result]], None] | None = None, tag: str = "",
                 before_rename: Callable[[], None] | None = None, format: str = "parquet", model: str = ""):
        self.out_dir = out_dir
        self.format, self.model = format, model
        self.on_commit = on_commit
        self.before_rename = before_rename
        self.schema = schema
        self.rows_per_file = rows_per_file
        self._rows: list[Result] = []
        self.owner = owner
        self._run = owner.run + (f"-{tag}" if tag else "")
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
        name = f"part-{self._run}-{self._seq:05d}{PART_SUFFIXES[self.format]}"
        tmp = self.owner.temp(self.out_dir / name)
        try:
            with open(tmp, "wb") as f:
                if self.format == "parquet":
                    pq.write_table(self._to_table(self._rows), f, compression="zstd")
                else:
                    own = [x.name for x in self.schema if is_own(x)]
                    keep = [x.name for x in self.schema][len(BASE_SCHEMA) + len(own):]
                    jsonl_parts.write_results(f, self._rows, self.format, keep, self.model, own)
                f.flush()
                os.fsync(f.fileno())
            if self.before_rename is not None:
                self.before_rename()
            os.replace(tmp, self.out_dir / name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # best effort; a rerun removes it too
            raise
        self._seq += 1
        self.rows_written += len(self._rows)
        committed, self._rows = self._rows, []  # in place: never written twice, even if the fsync below fails
        fsync_dir(self.out_dir)
        if self.on_commit is not None:
            self.on_commit(committed)

    def close(self) -> None:
        self.flush()

    def _to_table(self, rows: list[Result]) -> pa.Table:
        return results_table(rows, self.schema)


def results_table(rows: list[Result], schema: pa.Schema) -> pa.Table:
    """Results as an output table of `schema` (BASE_SCHEMA, the own columns, then the keep columns, taken from
    `Result.keep`)."""
    columns: dict[str, list[Any]] = {
        "id": [r.id for r in rows],
        "text": [r.text for r in rows],
        "error": [r.error for r in rows],
        "finish_reason": [r.finish_reason for r in rows],
        "prompt_tokens": [r.prompt_tokens for r in rows],
        "output_tokens": [r.output_tokens for r in rows],
    }
    for f in list(schema)[len(BASE_SCHEMA):]:
        columns[f.name] = [own_value(r, f.name) for r in rows] if is_own(f) else [r.keep.get(f.name) for r in rows]
    try:
        return pa.Table.from_pydict(columns, schema=schema)
    except _VALUE_ERRORS:  # one value that does not fit must not cost the rows beside it
        ids = columns["id"]
        return pa.Table.from_arrays([_fitted(columns[f.name], f, ids) for f in schema], schema=schema)


_VALUE_ERRORS = (pa.ArrowException, ValueError, TypeError, OverflowError, RecursionError)


def _fitted(values: list[Any], field: pa.Field, ids: list[Any]) -> pa.Array:
    """`values` as an array of the field's type, each value that does not fit made to: in a string column,
    its JSON text (`jsonish`), with anything UTF-8 cannot encode (lone surrogates) as backslash escapes;
    in any other column, null, with a warning naming the row and the column."""
    try:
        return pa.array(values, field.type)
    except _VALUE_ERRORS:
        pass
    text = pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
    if text:
        values = [_text(v) for v in values]
        try:
            return pa.array(values, field.type)
        except _VALUE_ERRORS:
            pass
    fitted = []
    for row_id, value in zip(ids, values, strict=True):
        try:
            pa.array([value], field.type)
        except _VALUE_ERRORS as e:
            log.warning("output: row %s: its %r value does not fit the column's type %s (%s); written as null",
                        _text(row_id), field.name, field.type, e)
            value = None
        fitted.append(value)
    return pa.array(fitted, field.type)


def _text(value: Any) -> str | None:
    """A value as valid UTF-8 text: strings as they are, anything else as its JSON (or Python) text."""
    if value is not None and not isinstance(value, str):
        try:
            value = jsonish(value)
        except _VALUE_ERRORS:
            value = f"<{type(value).__name__} that has no JSON text>"
    return None if value is None else value.encode("utf-8", "backslashreplace").decode("utf-8")


def table_results(table: pa.Table) -> list[Result]:
    """The reverse of `results_table`: output rows as Results (their image counts are not in the table). Every
    column after BASE_SCHEMA's is in `keep`, the own ones too (an export writes them as they are); the sample
    index is also the Result's `sample`."""
    keep_names = table.schema.names[len(BASE_SCHEMA):]
    samples = has_own(table.schema, "sample")
    return [Result(r["id"], r["text"], r["error"], r["finish_reason"], r["prompt_tokens"], r["output_tokens"],
                   {c: r[c] for c in keep_names}, sample=r["sample"] if samples else None)
            for r in table.to_pylist()]
