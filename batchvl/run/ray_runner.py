"""`batchvl run job.yaml --ray [ADDRESS]`: the job as a Ray Data pipeline.

    read (one task per input file) -> Prepare (CPU actors) -> Engine (one actor per GPU) -> this process writes

Reading goes through Ray's file-based reader machinery, but each file is parsed by batchvl's own reader
(`read_file_rows`), not by `ray.data.read_json` / `read_parquet`. That is what keeps a Ray run's output
equal to a local one: a bad JSONL line becomes an error row instead of failing the read; the default ids
(`file:line`, `file:row`) need the record's position, which Ray's readers do not give; and pyarrow's JSON
type inference would fail on a column holding a string in one row and a list in another, and fills missing
struct keys with nulls, which changes message rows and JSONL keep columns. Records reach Prepare pickled,
as Python values, exactly as a local run reads them.

Before the read, the ids already in the output are taken from it (resume) and the input's ids are scanned
once (in Ray read tasks; the ids themselves are counted here, as a local run does) to find duplicates: the
first occurrence runs, later ones become `input: duplicate id` error rows with the same keys as a local run.
Rows already done are dropped in the read tasks, before any media work.

The results come back to this process, which writes them with the same PartWriter as a local run: the same
schema, atomic part files, the same `_summary.json`, the same resume. Output rows are small (text and
counts), so this is no bottleneck; the output folder need only be reachable from here. Input files and
media given as paths must be readable from every node (a shared filesystem), as for Ray's own readers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchvl.config import Job
from batchvl.config.spec import is_url
from batchvl.errors import JobError
from batchvl.io.ids import Ids
from batchvl.io.readers import count_rows, read_file_rows
from batchvl.io.writer import read_done, table_results
from batchvl.run.fingerprint import read_fingerprint
from batchvl.run.output import DUPLICATE_ERROR, duplicate_key, fixed_records, nothing_to_do, open_output, open_writer
from batchvl.run.plan import Plan, check_ids_stay, plan_job
from batchvl.run.progress import Progress
from batchvl.run.ray_session import check_address, ray_session
from batchvl.run.ray_stages import (
    ROW_ERROR,
    ROW_FILE,
    ROW_ID,
    ROW_RECORD,
    ROW_SOURCE,
    Engine,
    Prepare,
    check_ray_settings,
    require_ray,
)
from batchvl.run.signals import Stop
from batchvl.run.summary import FolderRows, OutputCounts, Summary

log = logging.getLogger(__name__)

READ_BLOCK_ROWS = 1024  # rows per block a read task yields
READ_CPUS = 0.5  # CPUs a read task asks for (parsing records is light next to preparing media)
POSITION_BITS = 40  # a row's input order: file index << POSITION_BITS | record number within the file


@dataclass(frozen=True)
class RayOptions:
    """How the pipeline is laid out on the cluster. None: chosen from the cluster's resources."""

    address: str | None = None  # None: ray.init() (RAY_ADDRESS, a running local cluster, or a new one)
    prepare_actors: int | None = None  # Prepare actors (1 CPU each); default: the cluster's CPUs less the engines
    engines: int | None = None  # Engine actors; default: one per GPU, or 1 on a cluster without GPUs

    def __post_init__(self):
        check_address(self.address)


def _input_datasource(ray: Any, files: list[Path], ids: Ids, keys_only: bool,
                      done_ref: Any = None, firsts_ref: Any = None):
    """A Ray datasource over the job's input files, one read task per file, parsed by batchvl's reader.

    keys_only: blocks of (id, order, source), for the duplicate scan. Otherwise blocks of the ROW_* columns,
    without the rows whose output id is in the object `done_ref` (a set), and with later duplicates of the
    ids in `firsts_ref` (id -> (order, source) of the first occurrence) turned into error rows."""
    from ray.data.datasource import FileBasedDatasource

    known = {os.path.realpath(f): (i, f) for i, f in enumerate(files)}

    class InputRows(FileBasedDatasource):
        def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
            index, file = known[os.path.realpath(path)]
            done = ray.get(done_ref) if done_ref is not None else set()
            firsts = ray.get(firsts_ref) if firsts_ref is not None else {}
            block: list[dict[str, Any]] = []
            for number, row in enumerate(read_file_rows(file, ids)):
                order = index << POSITION_BITS | number
                if keys_only:
                    block.append({"id": row.id, "order": order, "source": row.source})
                else:
                    item = _pending(row, order, file, done, firsts)
                    if item is not None:
                        block.append(item)
                if len(block) >= READ_BLOCK_ROWS:
                    yield pa.Table.from_pylist(block, schema=_KEY_SCHEMA if keys_only else _ROW_SCHEMA)
                    block = []
            if block:
                yield pa.Table.from_pylist(block, schema=_KEY_SCHEMA if keys_only else _ROW_SCHEMA)

    return InputRows([str(f) for f in files])


_KEY_SCHEMA = pa.schema([("id", pa.string()), ("order", pa.int64()), ("source", pa.string())])
_ROW_SCHEMA = pa.schema([(ROW_ID, pa.string()), (ROW_SOURCE, pa.string()), (ROW_FILE, pa.string()),
                         (ROW_RECORD, pa.binary()), (ROW_ERROR, pa.string())])


def _pending(row, order: int, file: Path, done: set[str], firsts: dict[str, tuple[int, str]]) -> dict | None:
    """The row as the read hands it on (None: already in the output). Same rule as the local run's
    `_pending_rows`: a later occurrence of an id becomes an error row keyed by `duplicate_key`."""
    first = firsts.get(row.id)
    key, error, data = row.id, row.error, row.data
    if first is not None and first[0] != order:
        key, data = duplicate_key(row.id, row.source), None
        error = f"{DUPLICATE_ERROR} {row.id!r} (first at {first[1]})"
    if key in done:
        return None
    record = None if data is None else pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
    return {ROW_ID: key, ROW_SOURCE: row.source, ROW_FILE: str(file), ROW_RECORD: record, ROW_ERROR: error}


def _duplicates(ray: Any, files: list[Path], ids: Ids) -> dict[str, tuple[int, str]]:
    """Ids that occur more than once in the input: id -> (order, source) of the first occurrence. Without an
    id column the ids are positions, unique by construction."""
    if ids.column is None:
        return {}
    keys = ray.data.read_datasource(_input_datasource(ray, files, ids, keys_only=True), num_cpus=READ_CPUS)
    first: dict[str, tuple[int, str]] = {}
    repeated: set[str] = set()
    for batch in keys.iter_batches(batch_format="pyarrow", batch_size=None):
        for row_id, order, source in zip(*(batch.column(c).to_pylist() for c in ("id", "order", "source")),
                                         strict=True):
            seen = first.get(row_id)
            if seen is not None:
                repeated.add(row_id)
            if seen is None or order < seen[0]:  # read tasks finish in any order
                first[row_id] = (order, source)
    return {i: first[i] for i in repeated}


def for_cluster(ray: Any, job: Job) -> Job:
    """The job with `engine.device` and `engine.dtype` resolved for the cluster rather than for this process
    (the head node often has no GPU): auto is cuda when the cluster has GPUs, and the dtype follows as in a
    local run (bfloat16 on CUDA, float32 on the CPU). The fingerprint and every actor then agree."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if job.engine.device == "cuda" and not gpus:
        raise JobError("engine.device: cuda, but the Ray cluster has no GPUs")
    return _resolved(job, gpus > 0)


def _resolved(job: Job, cluster_has_gpus: bool) -> Job:
    device = job.engine.device
    if device == "auto":
        device = "cuda" if cluster_has_gpus else "cpu"
    dtype = job.engine.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    # engine.gpus is this host's worker processes; here each engine actor holds one GPU that Ray assigns
    return dataclasses.replace(job, engine=dataclasses.replace(job.engine, device=device, dtype=dtype, gpus=1))


def finished_plan(job: Job, retry_errors: bool) -> Plan | None:
    """The plan of a rerun that has nothing to do, told without Ray: the output folder holds a row for every
    input row, and was written by this job (a changed job is refused here, as a full run refuses it). None:
    there is work to do, or the folder is new. Nothing in the folder is changed.

    Cheap where there is work: every input row has its own output id (first occurrences their id, later
    duplicates and bad lines their own keys), so fewer ids in the folder than rows in the input means work,
    and only a folder with as many is read through. The engine's dtype counts in the fingerprint and, with
    `device: auto` and `dtype: auto`, depends on whether the cluster has GPUs: the folder's own says which."""
    recorded = read_fingerprint(job.output_dir)
    if recorded is None:
        return None
    done = read_done(job.output_dir)
    if len(done.ids) < count_rows(job.input.files, job.input.format) or (retry_errors and done.failed):
        return None
    plan = plan_job(_resolved(job, recorded.get("engine.dtype") == "bfloat16"), read_output=False)
    plan.take_done(done)
    check_ids_stay(job, plan)
    if fixed_records(plan, done.unreadable):  # a record fixed since: the run replaces its error row
        return None
    return plan if nothing_to_do(plan) else None


def _layout(ray: Any, job: Job, options: RayOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """map_batches arguments of the two stages, for a job resolved by `for_cluster`. Engines: one actor per
    GPU when the job runs on CUDA (half a CPU each for its host work), else one actor holding a CPU.
    Prepare: actors of one CPU on what is left, after READ_CPUS for the read tasks (actors hold their CPUs,
    so reads must keep some); on a cluster too small for a whole one, one actor on the fraction left."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    on_gpu = job.engine.device == "cuda"
    engines = options.engines or (gpus if on_gpu else 1)
    engine_cpus = 0.5 if on_gpu else 1.0
    left = cpus - engines * engine_cpus - READ_CPUS
    prepare = options.prepare_actors or max(1, int(left))
    prepare_cpus = 1.0 if left >= prepare else max(left / prepare, 0.1)
    pool = ray.data.ActorPoolStrategy
    engine_args = dict(num_gpus=1 if on_gpu else 0, num_cpus=engine_cpus, compute=pool(size=engines))
    prepare_args = dict(num_cpus=prepare_cpus, compute=pool(min_size=1, max_size=prepare))
    log.info("ray: %g CPU(s), %d GPU(s): %d engine actor(s)%s, up to %d prepare actor(s) of %g CPU", cpus, gpus,
             engines, " on GPUs" if on_gpu else " on the CPU", prepare, prepare_cpus)
    return prepare_args, engine_args


def run_ray_job(job: Job, options: RayOptions, overwrite: bool = False, retry_errors: bool = False,
                progress: bool = True, wait: bool = False) -> Summary:
    """Run a job as a Ray Data pipeline (see the module docstring) and return its summary. The output folder
    is the same as a local run's: a rerun (local or Ray) skips the rows already written."""
    check_ray_settings(job)
    if "media" in job.input.formats:  # Ray reads the input file by file; a media folder is one entry
        raise JobError("input.path: a folder or glob of media files runs locally, not with --ray (yet); list the "
                       "files in a JSONL file with an image column to run them on Ray")
    if is_url(job.input.path):  # Ray's file datasource lists local paths
        raise JobError("input.path: an fsspec URL input runs locally, not with --ray (yet); run it without --ray, "
                       "or copy the files to a shared local path")
    ray = require_ray()
    start = time.perf_counter()
    finished = None if overwrite else finished_plan(job, retry_errors)
    if finished is not None:
        log.info("nothing to do: all %d input row(s) are in %s; Ray was not started", finished.rows,
                 job.output_dir)
        return Summary(skipped=len(finished.done), counts_images=False, elapsed_s=time.perf_counter() - start,
                       folder=FolderRows(finished.done_ok, finished.done_failed, finished.done_examples))
    with ray_session(ray, options.address, verbose=log.isEnabledFor(logging.DEBUG)):  # DEBUG: -v
        job = for_cluster(ray, job)
        with open_output(job, overwrite, retry_errors, wait=wait) as plan, Stop() as stop:
            log.info("plan:\n%s", plan.describe())
            summary = _run(ray, job, plan, options, stop, start, progress)
        summary.interrupted = stop.signum
    return summary


def _run(ray: Any, job: Job, plan, options: RayOptions, stop: Stop, start: float,
         progress: bool) -> Summary:
    files = plan.files
    firsts = _duplicates(ray, files, plan.ids)
    done_ref, firsts_ref = ray.put(plan.done), ray.put(firsts)
    prepare_args, engine_args = _layout(ray, job, options)
    rows = _input_datasource(ray, files, plan.ids, False, done_ref, firsts_ref)
    ds = ray.data.read_datasource(rows, num_cpus=READ_CPUS)
    ds = ds.map_batches(Prepare, fn_constructor_kwargs={"job": job}, batch_format="pyarrow",
                        batch_size=max(job.engine.max_batch_size, 16), **prepare_args)
    ds = ds.map_batches(Engine, fn_constructor_kwargs={"job": job}, batch_format="pyarrow",
                        batch_size=job.engine.max_batch_size, **engine_args)

    summary = Summary(skipped=len(plan.done), counts_images=False)
    counts = OutputCounts.of(plan, start)
    writer = open_writer(job, files, counts.commit, plan.claim)
    bar = Progress(total=max(plan.rows - len(plan.done), 0), enabled=progress)
    completed = False  # _summary.json says "failed", not "finished", when an exception ends the run
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for result in table_results(batch):
                writer.add(result)
                summary.add(result)
                bar.update(result)
            if stop.signum:
                break
        writer.close()
        completed = True
    finally:
        writer.close_after_error()  # after an error elsewhere: commit the finished rows still buffered
        bar.close()
        counts.write("interrupted" if stop.signum else "finished" if completed else "failed")
    summary.committed, summary.folder = counts.this_run, counts.rows()
    summary.elapsed_s = time.perf_counter() - start
    return summary
