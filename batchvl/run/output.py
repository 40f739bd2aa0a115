"""The output folder as a run sees it: made ready to take rows (`open_output`), written through a
`SafeWriter`, and the input rows still to run (`pending_rows`), each id once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchvl.config import Job
from batchvl.core import Result, Row
from batchvl.errors import OutputWriteError
from batchvl.io.ids import Ids
from batchvl.io.readers import read_rows
from batchvl.io.shards import Shard
from batchvl.io.writer import PartWriter, clear_output, drop_rows, output_schema, read_done, remove_temp_parts
from batchvl.run.faults import fault_point
from batchvl.run.fingerprint import read_fingerprint, write_fingerprint
from batchvl.run.plan import Plan, plan_job

log = logging.getLogger(__name__)


def open_output(job: Job, overwrite: bool = False, retry_errors: bool = False) -> Plan:
    """Plan the job and make its output folder ready to take rows: `--overwrite` clears it, leftovers of a
    killed run go, the fingerprint is written (or checked), `--retry-errors` removes the error rows to run
    again. The plan's `done` holds the ids already written, which a run skips."""
    plan = plan_job(job, check_output=not overwrite)
    out_dir = job.output_dir
    if overwrite:
        removed = clear_output(out_dir)
        log.info("--overwrite: removed %d part file(s) from %s", removed, out_dir)
        plan.done, plan.done_ok, plan.done_failed = set(), 0, {}
    leftovers = remove_temp_parts(out_dir)
    if leftovers:
        log.info("removed %d temporary part file(s) left by an interrupted run", leftovers)
    if read_fingerprint(out_dir) is None:
        if plan.done:
            log.warning("%s has no %s (written by an older batchvl); taking this job's", out_dir, "fingerprint")
        write_fingerprint(out_dir, plan.fingerprint)
    if retry_errors:
        dropped = drop_rows(out_dir, lambda _id, error: error is not None and not error.startswith(DUPLICATE_ERROR))
        log.info("--retry-errors: %d error row(s) removed from the output, to run again", dropped)
        plan.done, plan.done_ok, plan.done_failed = read_done(out_dir)
    return plan


def open_writer(job: Job, files: list[Path], on_commit: Callable[[list[Result]], None], tag: str = "") -> SafeWriter:
    """The writer of a run's part files, with the output schema of the job (its keep columns typed as the input's)
    and the `write` fault point of the crash tests. `tag` names an engine worker's parts."""
    out = job.output_dir
    schema = output_schema(keep_types(job, files))
    return SafeWriter(out, PartWriter(out, schema, job.output.rows_per_file, on_commit=on_commit, tag=tag,
                                      before_rename=lambda: fault_point("write")))


class SafeWriter:
    """A PartWriter whose OSErrors become OutputWriteError (the run stops; what was committed stays). After one,
    nothing more is written."""

    def __init__(self, out_dir: Path, writer: PartWriter):
        self.out_dir, self.writer = out_dir, writer
        self.ok = True

    def add(self, result: Result) -> None:
        """Buffer a row; commit a part when it is full."""
        self._guard(self.writer.add, result)

    def close(self) -> None:
        """Commit the rows still buffered."""
        self._guard(self.writer.close)

    def close_after_error(self) -> None:
        """Commit the finished rows still buffered, unless writing is what failed (best effort, never raises)."""
        if self.ok:
            try:
                self.writer.close()
            except OSError:
                log.exception("could not commit the last rows")

    def _guard(self, action, *args) -> None:
        try:
            action(*args)
        except OSError as e:
            self.ok = False
            raise OutputWriteError(f"output.path: cannot write to {self.out_dir}: {e}; what was committed is "
                                   "kept, rerun the same command to resume") from None


def keep_types(job: Job, files: list[Path]) -> dict[str, pa.DataType]:
    """The output type of each keep column. JSONL input (any file of it): strings (see core.jsonish). Parquet:
    the column's type, unified over every input file's footer as pyarrow's permissive promotion does (null with
    string is string, int32 with int64 is int64, int with float is float64, ...); where the types have no
    common one (int64 and string, say), a string column holding each non-string value as its JSON text."""
    if not job.output.keep_columns:
        return {}
    if any(f.suffix == ".jsonl" for f in files):
        return {c: pa.string() for c in job.output.keep_columns}
    schemas = [pq.ParquetFile(f).schema_arrow for f in files]
    types = {}
    for column in job.output.keep_columns:
        found = [pa.schema([s.field(column)]) for s in schemas if column in s.names]
        try:
            types[column] = pa.unify_schemas(found, promote_options="permissive").field(column).type
        except (pa.ArrowException, ValueError) as e:
            log.info("output.keep_columns: %r has no common type across the input files (%s); written as "
                     "strings, non-strings as JSON", column, " ".join(str(e).split()))
            types[column] = pa.string()
    return types


DUPLICATE_ERROR = "input: duplicate id"


def duplicate_key(row_id: str, source: str) -> str:
    """The output id of the error row for a later duplicate of `row_id`, read at `source` (`file:line`)."""
    return f"{row_id}#dup@{source}"


def pending_rows(files: list[Path], ids: Ids, done: set[str], shard: Shard | None = None) -> Iterator[tuple[Path, Row]]:
    """The input rows still to run. The first occurrence of an id is the row; a later one becomes an error row
    with id `duplicate_key(id, source)`, so that output ids stay unique. Ids (and duplicate keys) already in
    the output are skipped: that is how a rerun resumes. With a shard, only the ids it owns."""
    first: dict[str, str] = {}
    for file, row in read_rows(files, ids):
        fault_point("read")
        if shard is not None and not shard.owns(row.id):
            continue
        seen = first.get(row.id)
        if seen is None:
            first[row.id] = row.source
            if row.id not in done:
                yield file, row
            continue
        key = duplicate_key(row.id, row.source)
        if key not in done:
            yield file, Row(id=key, source=row.source, data=None,
                            error=f"{DUPLICATE_ERROR} {row.id!r} (first at {seen})")
