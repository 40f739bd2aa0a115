"""The job loop: read rows, prepare them ahead of the engine, run the engine, write the results.

`plan_job` checks everything a run needs before anything heavy happens (it is also `batchvl validate`);
`run_job` then streams: reader -> preparation threads -> engine batches -> part writer.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from batchvl.core import Request, Result, Row
from batchvl.engine import GenerationParams, make_engine
from batchvl.engine.timing import StageTimes
from batchvl.faults import fault_point
from batchvl.fingerprint import check_fingerprint, job_fingerprint, read_fingerprint, write_fingerprint
from batchvl.io.readers import columns_of, count_rows, read_rows
from batchvl.io.writer import (
    SUMMARY_NAME,
    PartWriter,
    clear_output,
    drop_rows,
    error_kind,
    output_schema,
    read_done,
    remove_temp_parts,
    write_json_atomic,
)
from batchvl.job import Job, JobError
from batchvl.media.fetch import FetchSettings
from batchvl.media.prefetch import Prefetcher
from batchvl.models.checkpoint import (
    LAYOUT_OPENGVLAB,
    CheckpointInfo,
    checkpoint_chat_template,
    load_tokenizer,
    resolve_model_dir,
    stop_token_ids,
)
from batchvl.models.loader import build_specs
from batchvl.prepare import PrepareSettings, RowPreparer
from batchvl.progress import Progress
from batchvl.prompt import PromptBuilder
from batchvl.shards import Shard
from batchvl.templates import ConversationTemplate, default_system_message, get_template

log = logging.getLogger(__name__)

JSONL_COLUMN_SCAN = 1000  # JSONL records looked at when checking that a column exists


@dataclass
class Plan:
    """What a run will do, checked: the model, its tokenizer and template, the input and the output."""

    job: Job
    checkpoint: CheckpointInfo
    tokenizer: Any
    template: str | ConversationTemplate | None
    files: list[Path]
    rows: int
    done: set[str] = field(default_factory=set)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    done_ok: int = 0  # rows of the output folder without error, and failed ones by error kind
    done_failed: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        job = self.job
        lines = [
            f"model:    {self.checkpoint.path} ({self.checkpoint.layout} layout, "
            f"{self.checkpoint.tokens_per_tile} tokens per tile)",
            f"backend:  {job.engine.backend} (device {job.engine.device}, dtype {job.engine.dtype}, "
            f"batch {job.engine.max_batch_size})" + _workers_note(job),
            f"template: {job.chat_template}" + _template_note(self.template),
            f"input:    {len(self.files)} file(s), {self.rows} row(s)",
            f"output:   {job.output_dir} ({len(self.done)} row(s) already done)",
        ]
        return "\n".join(lines)


def _workers_note(job: Job) -> str:
    devices = job.engine.devices
    if len(devices) == 1:
        return ""
    from batchvl.worker import worker_label

    labels = ", ".join(worker_label(d, job.engine.device == "cpu") for d in devices)
    return f"\nworkers:  {len(devices)} engine worker processes ({labels})"


def _template_note(template: str | ConversationTemplate | None) -> str:
    if template is None:
        return " (prompt used raw)"
    if isinstance(template, ConversationTemplate):
        return f" (InternVL conversation template {template.name})"
    return " (jinja)"


def plan_model(job: Job) -> Plan:
    """The model half of the plan: checkpoint, tokenizer and chat template, checked; no input or output.
    (The pipeline API hands rows over in memory and needs only this.)"""
    path = resolve_model_dir(job.model, job.base_dir)
    checkpoint = CheckpointInfo.read(path)
    if job.engine.backend == "transformers" and checkpoint.layout == LAYOUT_OPENGVLAB \
            and not job.engine.trust_remote_code:
        raise JobError("engine.trust_remote_code: this is an OpenGVLab-layout checkpoint (InternVLChatModel); the "
                       "transformers backend can only load it with its own code: set engine.trust_remote_code: true")
    if job.engine.backend == "native":
        build_specs(checkpoint)  # an unsupported family or config fails here, before any work
    tokenizer = load_tokenizer(path, job.engine.trust_remote_code)
    template = _resolve_template(job, checkpoint, tokenizer)
    return Plan(job, checkpoint, tokenizer, template, files=[], rows=0)


def plan_job(job: Job, check_output: bool = True) -> Plan:
    """Check everything a run would, without changing anything. Raises JobError naming the key.
    `check_output`: also refuse an output folder written by a job with a different fingerprint."""
    plan = plan_model(job)
    plan.files = job.input.files
    for file in plan.files:
        _check_columns(job, file)
    _check_writable(job.output_dir)
    plan.fingerprint = job_fingerprint(job, plan.checkpoint, plan.template)
    if check_output:
        check_fingerprint(job, plan.fingerprint)
    plan.rows = count_rows(plan.files)
    plan.done, plan.done_ok, plan.done_failed = read_done(job.output_dir)
    return plan


def _resolve_template(job: Job, checkpoint: CheckpointInfo, tokenizer: Any) -> str | ConversationTemplate | None:
    """`none`: raw prompts; a .jinja file; or `auto`: the tokenizer's (or processor's) own template, else
    the InternVL conversation template that an OpenGVLab config names."""
    if job.chat_template == "none":
        return None
    if job.chat_template != "auto":
        return job.resolve(job.chat_template).read_text(encoding="utf-8")
    template = checkpoint_chat_template(checkpoint.path, tokenizer)
    if template is not None:
        return template
    name = checkpoint.template_name
    if name:
        try:
            return get_template(name)
        except KeyError as e:
            raise JobError(f"chat_template: auto, but the checkpoint's template {e.args[0]}") from None
    raise JobError("chat_template: auto, but the checkpoint has no chat template of its own; "
                   "use none (prompt used raw) or a .jinja file")


def _check_columns(job: Job, file: Path) -> None:
    wanted = {
        "input.id_column": job.input.id_column,
        "input.prompt_column": job.input.prompt_column,
        "input.image_column": job.input.image_column,
        "input.max_dynamic_patch_column": job.input.max_dynamic_patch_column,
        "input.messages_column": job.input.messages_column,
        "input.max_new_tokens_column": job.input.max_new_tokens_column,
        "input.video_column": job.input.video_column,
        **{f"output.keep_columns[{i}]": c for i, c in enumerate(job.output.keep_columns)},
    }
    try:
        if file.suffix == ".parquet":
            present = columns_of(file)
        else:
            present = _jsonl_columns(file)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise JobError(f"input.path: cannot read {file}: {e}") from None
    if present is None:  # an empty file has no columns to check
        return
    for key, column in wanted.items():
        if column is not None and column not in present:
            raise JobError(f"{key}: column {column!r} is not in {file.name} (columns: {', '.join(sorted(present))})")


def _jsonl_columns(file: Path) -> set[str] | None:
    """Keys seen in the first records of a JSONL file (records may omit keys, so several are looked at)."""
    import json

    seen: set[str] = set()
    looked = 0
    with open(file, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            looked += 1
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                seen.update(record)
            if looked >= JSONL_COLUMN_SCAN:
                break
    return seen if looked else None


def _check_writable(out_dir: Path) -> None:
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise JobError(f"output.path: {probe} is not a writable directory")


# ---------------------------------------------------------------------------------------------------------
# Running


@dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    images: int = 0
    output_tokens: int = 0
    skipped: int = 0
    elapsed_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)  # media wait, vision, prefill, decode, writing
    load_s: float = 0.0  # building the engine (loading the model), part of elapsed_s
    interrupted: int = 0  # the signal that stopped the run early (SIGINT, SIGTERM), 0 if it ran to the end
    committed: int = 0  # rows of this run committed to part files
    counts_images: bool = True  # False where results come back without their image count (the Ray path)

    def add(self, result: Result) -> None:
        """Count one row this run produced."""
        if result.error is None:
            self.ok += 1
            self.images += result.images
            self.output_tokens += result.output_tokens
        else:
            self.failed += 1

    def line(self, out_dir: Path) -> str:
        t = max(self.elapsed_s, 1e-9)
        done = self.ok + self.failed
        images = f"{self.images / t:.2f} images/s, " if self.counts_images else ""
        return (f"batchvl: {self.ok} rows ok, {self.failed} failed, {self.skipped} already done; "
                f"{self.elapsed_s:.1f} s, {done / t:.2f} rows/s, {images}"
                f"{self.output_tokens / t:.1f} output tokens/s -> {out_dir}")


class OutputWriteError(Exception):
    """Writing the output failed (disk full, permissions). The run stops; what was committed stays, resumable."""


class WorkerError(Exception):
    """An engine worker process died or failed. The others ran to the end; the rows it held were not written,
    and a rerun of the same command runs them."""


DUPLICATE_ERROR = "input: duplicate id"


def duplicate_key(row_id: str, source: str) -> str:
    """The output id of the error row for a later duplicate of `row_id`, read at `source` (`file:line`)."""
    return f"{row_id}#dup@{source}"


class Stop:
    """SIGINT / SIGTERM while running: the first asks the loop to stop after the batch in flight; a second exits
    at once with the same code (safe: part files are renamed into place whole, or not at all). `quiet`: say
    nothing (engine workers, whose coordinator speaks for them)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool = False):
        self.signum = 0
        self.quiet = quiet
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            os._exit(128 + self.signum)
        self.signum = signum
        if not self.quiet:
            name = signal.Signals(signum).name
            os.write(2, f"\nbatchvl: {name}: finishing the batch in flight, then stopping "
                        f"(again to stop at once)\n".encode())


def run_job(job: Job, overwrite: bool = False, progress: bool = True, sync_times: bool = False,
            retry_errors: bool = False, shard: Shard | None = None) -> Summary:
    """Run a job to the end (or to SIGINT/SIGTERM: `Summary.interrupted`) and return its summary.
    `sync_times` synchronises the device at each stage boundary, so the time split is exact (benchmarks); it
    costs a little throughput. `retry_errors` runs the rows whose `error` is set again. `shard` runs only the
    rows whose id the shard owns. With more than one device in `engine.gpus`, rows go to one engine worker
    process per device (batchvl.coordinator); with one, the engine runs here, in this process."""
    start = time.perf_counter()
    plan = open_output(job, overwrite, retry_errors)
    log.info("plan:\n%s", plan.describe())
    devices = job.engine.devices
    with Stop() as stop:
        if len(devices) > 1:
            from batchvl.coordinator import run_on_workers

            summary = run_on_workers(job, plan, devices, stop, start, progress, shard)
        else:
            if job.engine.device != "cpu" and devices[0] != 0 and torch.cuda.is_available():
                torch.cuda.set_device(devices[0])  # engine.gpus: [k], one GPU: still in this process
            summary = _run(job, plan, stop, start, progress, sync_times, shard)
    summary.interrupted = stop.signum
    return summary


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


def _run(job: Job, plan: Plan, stop: Stop, start: float, progress: bool, sync_times: bool,
         shard: Shard | None) -> Summary:
    load_start = time.perf_counter()
    engine = build_engine(job, plan)
    summary = Summary(skipped=len(plan.done), load_s=time.perf_counter() - load_start)
    counts = OutputCounts(job.output_dir, plan.done_ok, dict(plan.done_failed), start, shard)
    todo = counts.count_todo(job, plan)
    writer = SafeWriter(job.output_dir, PartWriter(job.output_dir, output_schema(keep_types(job, plan.files)),
                                                   job.output.rows_per_file, on_commit=counts.commit))
    bar = Progress(total=max(todo, 0), enabled=progress)
    times = getattr(engine, "times", None) or StageTimes()
    times.sync = sync_times

    def ran(results: list[Result]) -> None:
        for result in results:
            summary.add(result)
            bar.update(result)

    try:
        rows = pending_rows(plan.files, job.input.id_column, plan.done, shard)
        process_rows(job, engine, make_preparer(job, plan), rows, writer, lambda: bool(stop.signum), times, ran)
    finally:
        writer.close_after_error()
        bar.close()
        engine.close()
        counts.write("interrupted" if stop.signum else "finished")
    summary.committed = counts.this_run
    summary.elapsed_s = time.perf_counter() - start
    summary.stage_s = dict(times.seconds)
    return summary


def process_rows(job: Job, engine, preparer: RowPreparer, rows: Iterable[tuple[Path, Row]], writer: SafeWriter,
                 stopping: Callable[[], bool], times: StageTimes, ran: Callable[[list[Result]], None]) -> None:
    """The loop itself: rows are prepared ahead, run in engine batches and written; `ran(results)` after each
    batch. `stopping()` is asked before each batch. The writer is closed (its last part committed) at the end;
    after an error, the caller closes it with `close_after_error`."""
    prefetcher = make_prefetcher(job, rows, preparer)
    try:
        batches = batches_of(_timed(prefetcher, times, "media wait"), job.engine.max_batch_size)
        for batch in _with_lookahead(engine, batches):
            if stopping():
                break
            fault_point("batch")
            results = run_batch(engine, batch)
            with times.stage("writing"):
                for result in results:
                    writer.add(result)
            ran(results)
        writer.close()
    finally:
        prefetcher.close()


def build_engine(job: Job, plan: Plan):
    """The engine the job names, loaded on the device this process uses."""
    return make_engine(job.engine.backend, checkpoint=plan.checkpoint, tokenizer=plan.tokenizer,
                       params=generation_params(job, plan), device=job.engine.device, dtype=job.engine.dtype,
                       max_batch_size=job.engine.max_batch_size, max_batch_tokens=job.engine.max_batch_tokens,
                       overlap_vision=job.engine.overlap_vision, decode_attention=job.engine.decode_attention,
                       compile=job.engine.compile, trust_remote_code=job.engine.trust_remote_code)


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


def failed_by_kind(results: list[Result]) -> dict[str, int]:
    """How many of `results` failed, by error kind."""
    failed: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            kind = error_kind(r.error)
            failed[kind] = failed.get(kind, 0) + 1
    return failed


class OutputCounts:
    """The output folder's `_summary.json`: rows ok and failed (by error kind) over the whole folder, and this
    run's committed rows, seconds and rows/s. Rewritten atomically at each commit."""

    def __init__(self, out_dir: Path, ok: int, failed: dict[str, int], start: float, shard: Shard | None = None):
        self.out_dir, self.ok, self.failed, self.start = out_dir, ok, failed, start
        self.this_run = 0
        self.shard = shard
        self.shard_rows = 0  # input rows the shard owns
        self.shard_done = 0  # of those, already in the output when the run started
        self.name = shard.summary_name if shard else SUMMARY_NAME

    def count_todo(self, job: Job, plan: Plan) -> int:
        """Rows this run has to do (of the shard, with one), for the progress bar."""
        if self.shard is None:
            return plan.rows - len(plan.done)
        self.shard_rows = sum(1 for _, r in read_rows(plan.files, job.input.id_column) if self.shard.owns(r.id))
        self.shard_done = sum(1 for i in plan.done if self.shard.owns(i.split("#dup@")[0]))
        return self.shard_rows - self.shard_done

    def commit(self, results: list[Result]) -> None:
        """Count a committed part's rows."""
        self.add_committed(len(results), failed_by_kind(results))

    def add_committed(self, rows: int, failed: dict[str, int]) -> None:
        """Count `rows` committed rows, of which `failed` (by error kind) failed."""
        for kind, n in failed.items():
            self.failed[kind] = self.failed.get(kind, 0) + n
        self.ok += rows - sum(failed.values())
        self.this_run += rows
        self.write("running")

    def write(self, state: str) -> None:
        """Rewrite the summary file with `state` (running, finished, interrupted, failed)."""
        elapsed = time.perf_counter() - self.start
        try:
            shard = {} if self.shard is None else {
                "shard": self.shard.label, "rows_in_shard": self.shard_rows,
                "rows_done_in_shard": self.shard_done + self.this_run}
            write_json_atomic(self.out_dir / self.name, {
                "state": state,
                **shard,
                "rows_ok": self.ok,
                "rows_failed": sum(self.failed.values()),
                "failed_by_kind": dict(sorted(self.failed.items())),
                "rows_this_run": self.this_run,
                "elapsed_s": round(elapsed, 3),
                "rows_per_s": round(self.this_run / max(elapsed, 1e-9), 3),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
        except OSError as e:  # the summary is informative; the parts are what counts
            log.warning("could not write %s: %s", self.name, e)


def read_summary(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / SUMMARY_NAME).read_text(encoding="utf-8"))


def pending_rows(files: list[Path], id_column: str | None, done: set[str],
                  shard: Shard | None = None) -> Iterator[tuple[Path, Row]]:
    """The input rows still to run. The first occurrence of an id is the row; a later one becomes an error row
    with id `duplicate_key(id, source)`, so that output ids stay unique. Ids (and duplicate keys) already in
    the output are skipped: that is how a rerun resumes. With a shard, only the ids it owns."""
    first: dict[str, str] = {}
    for file, row in read_rows(files, id_column):
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


def _timed(items: Iterable[Any], times: StageTimes, stage: str) -> Iterator[Any]:
    """Yield from `items`, adding the time spent waiting for each one to `stage`."""
    it = iter(items)
    while True:
        with times.stage(stage):
            item = next(it, _DONE)
        if item is _DONE:
            return
        yield item


_DONE = object()


def _with_lookahead(engine, batches: Iterator[list[Request | Result]]) -> Iterator[list[Request | Result]]:
    """Yield batches one behind, telling the engine which requests come next (`engine.lookahead`), so it can
    start their vision pass while the current batch decodes. Engines without the hook just run in turn."""
    hook = getattr(engine, "lookahead", None)
    current = next(batches, None)
    while current is not None:
        following = next(batches, None)
        if hook is not None:
            hook([x for x in following or [] if isinstance(x, Request)])
        yield current
        current = following


def run_batch(engine, batch: list[Request | Result]) -> list[Result]:
    """Run the requests of a batch; error results pass through. Output keeps the batch's order."""
    requests = [x for x in batch if isinstance(x, Request)]
    results = iter(_generate(engine, requests) if requests else [])
    return [next(results) if isinstance(x, Request) else x for x in batch]


def _generate(engine, requests: list[Request]) -> list[Result]:
    """engine.generate, but a batch that runs out of device memory is split in halves and retried, down to one
    row; a row that does not fit alone becomes an error row (`oom: ...`)."""
    try:
        return engine.generate(requests)
    except torch.cuda.OutOfMemoryError:
        pass  # retried below, outside the handler: the exception's frames hold the failed attempt's tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(requests) == 1:
        r = requests[0]
        return [Result.failed(r.id, f"oom: device out of memory for this row alone ({len(r.prompt_ids)} "
                                    f"prompt tokens, {sum(r.tiles_per_image)} tiles)", r.keep)]
    half = len(requests) // 2
    log.warning("device out of memory on a batch of %d rows; retrying as %d + %d", len(requests), half,
                len(requests) - half)
    return _generate(engine, requests[:half]) + _generate(engine, requests[half:])


def batches_of(items: Iterable[Request | Result], size: int) -> Iterator[list[Request | Result]]:
    """Consecutive items, cut so that each batch holds `size` requests (error results ride along)."""
    batch: list[Request | Result] = []
    requests = 0
    for item in items:
        batch.append(item)
        requests += isinstance(item, Request)
        if requests == size:
            yield batch
            batch, requests = [], 0
    if batch:
        yield batch


def make_prefetcher(job: Job, rows: Iterable[tuple[Path, Row]], preparer: RowPreparer) -> Prefetcher:
    m = job.media
    threads = m.prepare_threads or os.cpu_count() or 1
    fetch = FetchSettings(http_timeout_s=m.http_timeout_s, http_retries=m.http_retries,
                          http_concurrency=m.http_concurrency)
    return Prefetcher(rows, preparer, job.media_root_for, max_rows=max(m.prefetch, job.engine.max_batch_size),
                      max_bytes=m.prefetch_mb << 20, threads=threads, fetch=fetch)


def make_preparer(job: Job, plan: Plan) -> RowPreparer:
    ck = plan.checkpoint
    max_tiles = job.media.max_dynamic_patch or ck.max_dynamic_patch
    min_tiles = job.media.min_dynamic_patch or ck.min_dynamic_patch
    use_thumbnail = ck.use_thumbnail if job.media.use_thumbnail is None else job.media.use_thumbnail
    settings = PrepareSettings(
        prompt=job.prompt, prompt_column=job.input.prompt_column, image_column=job.input.image_column,
        max_dynamic_patch_column=job.input.max_dynamic_patch_column,
        keep_columns=tuple(job.output.keep_columns),
        keep_as_json=any(f.suffix == ".jsonl" for f in plan.files),
        min_tiles=min_tiles, max_tiles=max_tiles, use_thumbnail=use_thumbnail, tile_size=ck.tile_size,
        max_prompt_tokens=ck.max_positions - job.generation.max_new_tokens,
        messages_column=job.input.messages_column, video_column=job.input.video_column,
        video_frames_column=job.input.video_frames_column, video_bound_column=job.input.video_bound_column,
        video_frames=job.media.video_frames, video_max_tiles=job.media.video_max_dynamic_patch,
        max_image_pixels=job.media.max_image_pixels,
        max_new_tokens_column=job.input.max_new_tokens_column, max_new_tokens=job.generation.max_new_tokens,
        pin_memory=job.engine.backend == "native" and job.engine.device != "cpu" and torch.cuda.is_available(),
    )
    system = default_system_message(plan.template.name, ck.config) \
        if isinstance(plan.template, ConversationTemplate) else None
    return RowPreparer(settings, PromptBuilder(plan.tokenizer, plan.template, ck.tokens_per_tile, system))


def keep_types(job: Job, files: list[Path]) -> dict[str, pa.DataType]:
    """Parquet input keeps its column types; JSONL keep columns are strings (see io.writer.jsonish)."""
    if not job.output.keep_columns:
        return {}
    if any(f.suffix == ".jsonl" for f in files):
        return {c: pa.string() for c in job.output.keep_columns}
    schema = pq.ParquetFile(files[0]).schema_arrow
    return {c: schema.field(c).type for c in job.output.keep_columns}


def generation_params(job: Job, plan: Plan) -> GenerationParams:
    g = job.generation
    stops = stop_token_ids(plan.checkpoint.path, plan.tokenizer)
    if isinstance(plan.template, ConversationTemplate):  # InternVL's chat() stops at the template's separator
        for text in plan.template.stop_strings:
            token = plan.tokenizer.convert_tokens_to_ids(text)
            if token is not None and token != plan.tokenizer.unk_token_id and token not in stops:
                stops.append(token)
    if not stops:
        raise JobError("model: the checkpoint names no EOS token (tokenizer or generation_config.json)")
    return GenerationParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                            top_k=g.top_k, repetition_penalty=g.repetition_penalty, seed=g.seed,
                            eos_token_ids=tuple(stops), stop_token_ids=tuple(g.stop_token_ids),
                            stop=tuple(g.stop), min_new_tokens=g.min_new_tokens, ignore_eos=g.ignore_eos)
