"""Streaming readers of the input formats (config.spec INPUT_FORMATS): JSONL (also gzip or zstd compressed)
and OpenAI batch request files, Parquet and Hugging Face Arrow files here; CSV/TSV (io.tabular), WebDataset
shards (io.tar_shards) and media folders (io.media_files) beside. None loads a file whole: memory stays bounded.

Nothing a record holds stops a read: a JSONL line that cannot be parsed (bad JSON, an integer past Python's
4,300 digits, nesting too deep, a line over `MAX_JSONL_LINE_BYTES`), a Parquet row group that cannot be
decoded, or a Parquet value with no Python equivalent each become that record's error row, and the records
after it are read as usual. Where a file cannot be read on at all (a truncated compressed stream or tar
archive), one error row says so, after the rows read before it.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchvl.config.spec import InputFile, RemoteFile, file_format
from batchvl.core import Row
from batchvl.io.ids import Ids
from batchvl.io.media_files import MEDIA_COLUMNS, count_media, read_media
from batchvl.io.openai_batch import chat_request_to_row
from batchvl.io.tabular import read_table_text, table_header
from batchvl.io.tar_shards import count_samples, read_shard, shard_columns
from batchvl.io.text import Record, one_line, open_input

PARQUET_BATCH_ROWS = 1024
MAX_JSONL_LINE_BYTES = 64 * 1024 * 1024  # a longer line is skipped (never held whole) and becomes an error row
JSONL_COLUMN_SCAN = 1000  # JSONL records looked at when checking that a column exists
_SKIP_CHUNK = 64 * 1024


def read_rows(files: list[InputFile], ids: Ids) -> Iterator[tuple[InputFile, Row]]:
    """Yield (file, row) for every record of every file, in order, named as `ids` says.

    A record that cannot be parsed, or lacks its id, is still yielded, with `data=None` and an `error`, so it
    becomes an error row and no input row is ever lost.
    """
    for path in files:
        for row in read_file_rows(path, ids):
            yield path, row


def read_file_rows(path: InputFile, ids: Ids) -> Iterator[Row]:
    """The rows of one input file, as `read_rows` gives them.

    Ids and sources are valid UTF-8 (a lone surrogate, from a JSON escape or an undecodable file name, is
    written as its backslash escape), so they can be written and found again on resume."""
    name, id_column = ids.name(path), ids.column
    for source, data, error, key in _records(path, file_format(path, ids.format), name, ids):
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


def _records(path: InputFile, fmt: str, name: str, ids: Ids) -> Iterator[Record]:
    if fmt == "jsonl":
        return _read_jsonl(path, name)
    if fmt == "openai-batch":
        return _read_requests(path, name)
    if fmt == "parquet":
        return _read_parquet(path, name, ids.column)
    if fmt == "hf-dataset":
        return _read_arrow(path, name, ids.column)
    if fmt in ("csv", "tsv"):
        return read_table_text(path, name, "\t" if fmt == "tsv" else ",")
    if fmt == "webdataset":
        return read_shard(path, name)
    if fmt == "media":
        return read_media(path, ids.name)
    raise ValueError(f"unknown input format {fmt!r}")  # config.spec refuses it first


_one_line = one_line


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


try:
    import zstandard
except ImportError:  # only .jsonl.zst input needs it (a core dependency; this is for a trimmed install)
    zstandard = None
# what a cut-short or corrupt compressed file raises as it is read
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, *((zstandard.ZstdError,) if zstandard else ()))


@contextmanager
def open_jsonl(path: InputFile) -> Iterator[IO[bytes]]:
    """A JSONL file for reading its bytes: `.gz` and `.zst` files decompressed as they are read."""
    name = path.name.lower()
    if name.endswith(".zst") and zstandard is None:
        raise OSError("reading .zst needs the zstandard package: pip install zstandard")
    with open_input(path) as raw:
        if name.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                yield f
        elif name.endswith(".zst"):
            yield io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False))
        else:
            yield raw


def _lines(path: InputFile, name: str) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(source, line, None) for each non-blank line; an over-long line as (source, None, why). A compressed file
    that cannot be decompressed on (truncated, corrupt) ends with one (source, None, why) for what is left."""
    number = 0
    try:
        with open_jsonl(path) as f:
            for number, line in jsonl_lines(f):
                source = f"{name}:{number}"
                if line is None:
                    yield source, None, (f"input: line {source} is longer than {MAX_JSONL_LINE_BYTES} bytes "
                                         "(MAX_JSONL_LINE_BYTES); skipped")
                else:
                    yield source, line, None
    except _DECOMPRESS_ERRORS as e:
        source = f"{name}:{number + 1}"
        yield source, None, (f"input: line {source} and the rest of {name} cannot be read (the file is cut short "
                             f"or corrupt after line {number}): {one_line(e)}")


def _read_jsonl(path: InputFile, name: str) -> Iterator[Record]:
    for source, line, error in _lines(path, name):
        if line is None:
            yield source, None, error, None
            continue
        data, error = parse_jsonl_line(line, source)
        yield source, data, error, None


def _read_requests(path: InputFile, name: str) -> Iterator[Record]:
    """OpenAI batch request lines (io.openai_batch): a line that cannot run is an error row, keyed by its
    custom_id when it has one."""
    for source, line, error in _lines(path, name):
        if line is None:
            yield source, None, error, None
            continue
        request, error = parse_jsonl_line(line, source)
        if request is None:
            yield source, None, error, None
            continue
        row, why = chat_request_to_row(request)
        if why is not None:
            yield source, None, f"input: request {source}: {why}", row["custom_id"]
        else:
            yield source, row, None, None


# ---- Parquet ----------------------------------------------------------------------------------------------

_READ_ERRORS = (OSError, ValueError, OverflowError, pa.ArrowException)


@contextmanager
def parquet_file(path: InputFile) -> Iterator[pq.ParquetFile]:
    """A Parquet file opened for reading row group by row group: a local one by pyarrow itself, one named by
    an fsspec URL through its fsspec file (pyarrow reads the footer, then each row group's byte ranges)."""
    if isinstance(path, RemoteFile):
        with open_input(path) as f:
            yield pq.ParquetFile(f)
    else:
        yield pq.ParquetFile(path)


def _read_parquet(path: InputFile, name: str, id_column: str | None) -> Iterator[Record]:
    """Row group by row group: a group that cannot be decoded (a corrupt page, say) makes its rows not yet
    given error rows, keyed by their ids when the id column alone can still be read, and the next group is
    read as usual. Positions (`file:row`) come from the footer, so they stay those of an intact read."""
    with parquet_file(path) as file:
        yield from _parquet_records(file, name, id_column)


def _parquet_records(file: pq.ParquetFile, name: str, id_column: str | None) -> Iterator[Record]:
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


def _read_arrow(path: Path, name: str, id_column: str | None) -> Iterator[Record]:
    """A Hugging Face `datasets` Arrow file (an Arrow IPC stream, as save_to_disk writes it), batch by batch.
    An image feature is its {bytes, path} struct, which media references read as they are."""
    number = 0
    try:
        with pa.memory_map(str(path)) as source, pa.ipc.open_stream(source) as reader:
            for batch in reader:
                for data, key, error in _batch_records(batch, id_column):
                    where = f"{name}:{number}"
                    yield where, data, None if error is None else f"input: record {where} {error}", key
                    number += 1
    except _READ_ERRORS as e:
        where = f"{name}:{number}"
        yield where, None, (f"input: record {where} and the rest of {name} cannot be read (the file is cut short "
                            f"or not an Arrow stream): {one_line(e)}"), None


def arrow_schema(path: InputFile, fmt: str) -> pa.Schema | None:
    """The typed schema of a Parquet or Arrow input file; None for formats whose values are text or JSON."""
    if fmt == "parquet":
        with parquet_file(path) as file:
            return file.schema_arrow
    if fmt == "hf-dataset":
        with pa.memory_map(str(path)) as source, pa.ipc.open_stream(source) as reader:
            return reader.schema
    return None


# ---- counts and columns -----------------------------------------------------------------------------------


def count_rows(files: list[InputFile], fmt: str = "auto") -> int:
    """Rows in the input: Parquet from its footer, Arrow from its batches' headers, WebDataset from its tar
    headers, media folders by a walk, the rest by a streaming count of records."""
    total = 0
    for path in files:
        kind = file_format(path, fmt)
        if kind == "parquet":
            with parquet_file(path) as file:
                total += file.metadata.num_rows
        elif kind == "hf-dataset":
            total += sum(1 for _ in _read_arrow_counts(path))
        elif kind == "webdataset":
            total += count_samples(path)
        elif kind == "media":
            total += count_media(path)
        elif kind in ("csv", "tsv"):
            total += sum(1 for _ in read_table_text(path, "", "\t" if kind == "tsv" else ","))
        else:
            total += sum(1 for _ in _lines(path, ""))
    return total


def _read_arrow_counts(path: Path) -> Iterator[None]:
    try:
        with pa.memory_map(str(path)) as source, pa.ipc.open_stream(source) as reader:
            for batch in reader:
                yield from (None for _ in range(batch.num_rows))
    except _READ_ERRORS:
        yield None  # the error row of what cannot be read


def columns_of(path: InputFile, fmt: str = "auto") -> set[str] | None:
    """The columns of an input file: the Parquet or Arrow schema, a CSV header, the columns every row of the
    format has (OpenAI batch, media), or the keys seen in the first JSONL_COLUMN_SCAN records of a JSONL file
    or samples of a WebDataset shard (records may omit keys; lines that cannot be parsed are passed over).

    None when the file has no records to look at.
    """
    kind = file_format(path, fmt)
    schema = arrow_schema(path, kind)
    if schema is not None:
        return set(schema.names)
    if kind == "openai-batch":
        return {"custom_id", "messages", "max_tokens", "model", "sampling"}
    if kind == "media":
        return set(MEDIA_COLUMNS)
    if kind in ("csv", "tsv"):
        return table_header(path, "\t" if kind == "tsv" else ",")
    if kind == "webdataset":
        return shard_columns(path, JSONL_COLUMN_SCAN)
    seen: set[str] = set()
    looked = 0
    for source, line, _ in _lines(path, ""):
        looked += 1
        if line is not None:
            record, _ = parse_jsonl_line(line, source)
            seen.update(record or ())
        if looked >= JSONL_COLUMN_SCAN:
            break
    return seen if looked else None
