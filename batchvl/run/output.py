"""The output folder as a run sees it: made ready to take rows (`open_output`), written through a
`SafeWriter`, and the input rows still to run (`pending_rows`), each id once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from batchvl.config import Job
from batchvl.core import Result, Row
from batchvl.errors import OutputWriteError
from batchvl.faults import fault_point
from batchvl.io.columns import own_columns
from batchvl.io.durable import Owner, remove_dead_temps
from batchvl.io.ids import Ids
from batchvl.io.lease import REWRITE, Claim, Lease, Scope, live_runs, remove_orphan_beats
from batchvl.io.readers import arrow_schema, read_rows
from batchvl.io.shards import Shard
from batchvl.io.writer import PartWriter, clear_output, drop_rows, output_schema, part_files, read_done
from batchvl.run.fingerprint import check_fingerprint, read_fingerprint, write_fingerprint
from batchvl.run.plan import Plan, check_ids_stay, plan_job

log = logging.getLogger(__name__)


@contextmanager
def open_output(job: Job, overwrite: bool = False, retry_errors: bool = False, shard: Shard | None = None,
                wait: bool = False, command: str = "") -> Iterator[Plan]:
    """Plan the job, take the output folder's lease (of the shard, with one; see batchvl.io.lease) for as long
    as the `with` block runs, and make the folder ready to take rows: `--overwrite` clears it, leftovers of
    killed runs go, the fingerprint is written once (or checked), `--retry-errors` removes the error rows to
    run again. The plan's `done` holds the ids already written, which a run skips, read once the lease is held.
    A run that clashes with one holding the folder is refused (JobError naming it), or waits for it (`wait`)."""
    plan = plan_job(job, check_output=False, read_output=False, fresh=overwrite)
    rewrites = overwrite or retry_errors
    scope = Scope(shard.index, shard.count, rewrites) if shard else Scope(0, 1, rewrites)
    with Lease(job.output_dir, scope, Owner.new(), wait=wait, command=command) as lease:
        plan.claim = lease.claim
        _prepare_folder(job, plan, overwrite, retry_errors, shard)
        yield plan


def _prepare_folder(job: Job, plan: Plan, overwrite: bool, retry_errors: bool, shard: Shard | None) -> None:
    out_dir, owner = job.output_dir, plan.claim.owner
    if overwrite:
        removed = clear_output(out_dir)
        log.info("--overwrite: removed %d part file(s) from %s", removed, out_dir)
    leftovers = remove_dead_temps(out_dir, live_runs(out_dir)) + remove_orphan_beats(out_dir)
    if leftovers:
        log.info("removed %d temporary file(s) left by interrupted runs", leftovers)
    check_fingerprint(job, plan.fingerprint)  # a run that finished before our lease may have written one
    if read_fingerprint(out_dir) is None:
        if part_files(out_dir):
            log.warning("%s has no %s (written by an older batchvl); taking this job's", out_dir, "fingerprint")
        if not write_fingerprint(out_dir, plan.fingerprint, owner, job.model):
            check_fingerprint(job, plan.fingerprint)  # a sibling shard wrote it first: it must be the same job
    if retry_errors:
        dropped = drop_rows(out_dir, lambda _id, error: error is not None and not error.startswith(DUPLICATE_ERROR),
                            owner)
        log.info("--retry-errors: %d error row(s) removed from the output, to run again", dropped)
    done = read_done(out_dir)
    plan.take_done(done)
    check_ids_stay(job, plan)  # before anything below acts on ids
    if done.unreadable and _replace_fixed_records(job, plan, done.unreadable, shard):
        plan.take_done(read_done(out_dir))


def _replace_fixed_records(job: Job, plan: Plan, unreadable: set[str], shard: Shard | None) -> int:
    """Remove the error rows of input records that could not be read before and read now (a bad JSON line
    fixed by hand), so that they run again; a shard, those it owns. Their error row's id is the record's
    position; the fixed record may have an id of its own, so without this the folder would keep both rows.
    Shards may do this at once: the `rewrite` lease lets one rewrite part files at a time."""
    fixed = fixed_records(plan, unreadable, shard)
    if not fixed:
        return 0
    with Lease(job.output_dir, REWRITE, plan.claim.owner, wait=True):
        dropped = drop_rows(job.output_dir, lambda row_id, error: row_id in fixed and error is not None,
                            plan.claim.owner)
    log.info("%d input record(s) that could not be read before read now: their error rows are replaced", dropped)
    return dropped


def fixed_records(plan: Plan, unreadable: set[str], shard: Shard | None = None) -> set[str]:
    """Of the output's rows whose input record could not be read (`unreadable`: their ids are the records'
    positions), those whose record reads now; with a shard, of those it owns. One pass over the input."""
    mine = {i for i in unreadable if shard is None or shard.owns(i)}
    if not mine:
        return set()
    return {row.source for _, row in read_rows(plan.files, plan.ids) if row.source in mine and row.error is None}


def open_writer(job: Job, files: list[Path], on_commit: Callable[[list[Result]], None], claim: Claim,
                tag: str = "") -> SafeWriter:
    """The writer of a run's part files, with the output schema of the job (its keep columns typed as the input's).
    Before each part is renamed into place it checks that the run still holds the folder's lease (`claim`), and
    passes the `write` fault point of the crash tests. `tag` names an engine worker's parts."""
    out = job.output_dir
    schema = output_schema(keep_types(job, files), own_columns(job.generation.n, job.output.include_prompt))

    def before_rename() -> None:
        fault_point("write")
        claim.check()

    return SafeWriter(out, PartWriter(out, schema, job.output.rows_per_file, claim.owner.here(), on_commit=on_commit,
                                      tag=tag, before_rename=before_rename, format=job.output.format,
                                      model=job.model))


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
        except OutputWriteError:  # the run lost the folder's lease: nothing more is written
            self.ok = False
            raise
        except OSError as e:
            self.ok = False
            raise OutputWriteError(f"output.path: cannot write to {self.out_dir}: {e}; what was committed is "
                                   "kept, rerun the same command to resume") from None


def typed_input(job: Job, files: list[Path] | None = None) -> list[pa.Schema] | None:
    """The schema of each input file when all are typed (Parquet, Hugging Face Arrow); None when any file is of a
    format whose values are text or JSON (JSONL, CSV, WebDataset, ...)."""
    schemas = [arrow_schema(f, job.input.format_of(f)) for f in (job.input.files if files is None else files)]
    return None if any(s is None for s in schemas) else schemas


def keep_types(job: Job, files: list[Path]) -> dict[str, pa.DataType]:
    """The output type of each keep column. Untyped input (any file of JSONL, CSV...): strings (see core.jsonish).
    Parquet or Arrow:
    the column's type, unified over every input file's footer as pyarrow's permissive promotion does (null with
    string is string, int32 with int64 is int64, int with float is float64, ...); where the types have no
    common one (int64 and string, say), a string column holding each non-string value as its JSON text."""
    if not job.output.keep_columns:
        return {}
    schemas = typed_input(job, files)
    if schemas is None:
        return {c: pa.string() for c in job.output.keep_columns}
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


def nothing_to_do(plan: Plan, shard: Shard | None = None) -> bool:
    """Whether every input row (of the shard) is already in the output folder, so that a run need not load the
    model. Cheap when there is work without a shard: fewer output rows in the folder than the input rows give
    means work (every input row has its own output id, and generation.n rows). Otherwise the input is read
    through until a pending row shows."""
    if shard is None and plan.done_rows < plan.rows * plan.job.generation.n:
        return False
    return next(plan_rows(plan, shard, faults=False), None) is None


def plan_rows(plan: Plan, shard: Shard | None = None, faults: bool = True) -> Iterator[tuple[Path, Row]]:
    """The plan's pending rows (`pending_rows`); with generation.n > 1, each with the samples it still owes."""
    owed = plan.owed if plan.job.generation.n > 1 else None
    return pending_rows(plan.files, plan.ids, plan.done, shard, faults, owed)


def pending_rows(files: list[Path], ids: Ids, done: set[str], shard: Shard | None = None, faults: bool = True,
                 owed: Callable[[str], tuple[int, ...]] | None = None) -> Iterator[tuple[Path, Row]]:
    """The input rows still to run. The first occurrence of an id is the row; a later one becomes an error row
    with id `duplicate_key(id, source)`, so that output ids stay unique. Ids (and duplicate keys) already in
    the output are skipped: that is how a rerun resumes. With `owed` (generation.n > 1: the samples an output id
    still owes, Plan.owed) a row is skipped when it owes none, and otherwise carries those (`Row.samples`), so
    that a row cut off by a crash runs only its missing samples. With a shard, only the ids it owns. `faults`:
    pass the fault-injection point of each row read (tests); a look ahead that is not the run's own read does
    not."""
    first: dict[str, str] = {}
    for file, row in read_rows(files, ids):
        if faults:
            fault_point("read")
        if shard is not None and not shard.owns(row.id):
            continue
        seen = first.get(row.id)
        key = row.id if seen is None else duplicate_key(row.id, row.source)
        if seen is None:
            first[row.id] = row.source
        else:
            row = Row(id=key, source=row.source, data=None, error=f"{DUPLICATE_ERROR} {row.id!r} (first at {seen})")
        if owed is None:
            if key not in done:
                yield file, row
            continue
        todo = owed(key)
        if todo:
            yield file, replace(row, samples=todo)
