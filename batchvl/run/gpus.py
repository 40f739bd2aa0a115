"""All the GPUs of a host: one engine worker process per device (batchvl.run.worker), fed by this process.

The coordinator reads the input as a stream, skips the rows already in the output (as a single-process run
does) and hands out chunks of raw rows, one engine batch each, on demand: a worker holds at most
`CHUNKS_AHEAD` chunks it has not taken yet, and gets the next one when it takes one. A slow worker therefore
asks for less and never holds up the others. Rows are written only by the workers, each to its own part
files; the coordinator keeps the counts (`_summary.json`, the progress bar, the summary line).

Exactly once: each pending row is sent to one worker, and a row is done only once it is in a committed part.
A worker that dies (or fails) is reported with its exit code and the rows it was given but had not committed;
it gets no more work, the others run to the end of the input, and the run fails (exit code 1). Rerunning the
same command runs the rows that were lost, and nothing twice.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from batchvl.config import Job
from batchvl.core import Row
from batchvl.errors import JobError, OutputWriteError, WorkerError
from batchvl.io.shards import Shard
from batchvl.run.loop import engine_rows
from batchvl.run.output import plan_rows
from batchvl.run.plan import Plan, generation_params, worker_label
from batchvl.run.progress import Progress
from batchvl.run.signals import Stop
from batchvl.run.summary import OutputCounts, Summary
from batchvl.run.worker import WorkerArgs, worker_main

log = logging.getLogger(__name__)

CHUNKS_AHEAD = 2  # chunks queued to a worker and not yet taken: enough that it never waits for the next one
EXIT_GRACE_S = 60.0  # after the run, how long a worker may take to exit before it is killed


@dataclass
class _Worker:
    label: str
    proc: multiprocessing.Process
    tasks: multiprocessing.Queue
    events: multiprocessing.connection.Connection
    ready: bool = False
    ready_at: float = 0.0  # perf_counter() here when its "ready" arrived
    queued: int = 0  # chunks sent and not yet taken
    given: int = 0  # rows sent
    committed: int = 0  # rows it committed
    ended: bool = False  # told there are no more rows
    done: bool = False  # reported that it finished
    stopped_by: int = 0  # the signal the worker itself received, if any
    exited: bool = False
    failure: tuple[str, str] | None = None  # (kind: job | write | crash | died, what happened)
    stage_s: dict[str, float] = field(default_factory=dict)

    def send(self, chunk: list[tuple[Path, Row]]) -> None:
        self.tasks.put(chunk)
        self.queued += 1
        self.given += len(chunk)

    def end(self) -> None:
        if not self.ended:
            self.tasks.put(None)
            self.ended = True


def run_on_workers(job: Job, plan: Plan, devices: list[int], stop: Stop, start: float, progress: bool,
                   shard: Shard | None) -> Summary:
    """Run the job's pending rows on one worker process per device (GPU ids; with engine.device cpu, CPU
    workers). Returns the summary; raises WorkerError (or the worker's JobError / OutputWriteError) after the
    run when a worker failed, and leaves the output resumable in every case."""
    generation_params(job, plan)  # its JobError (no EOS token) once, here, rather than from every worker
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    cpu = job.engine.device == "cpu"
    counts = OutputCounts.of(plan, start, shard)
    todo = counts.count_todo(plan)
    chunks = _chunks(plan_rows(plan, shard), engine_rows(job))
    first = next(chunks, None)
    labels = [worker_label(d, cpu) for d in devices]
    bar = Progress(total=max(todo, 0), enabled=progress, workers=labels)
    summary = Summary(skipped=plan.done_rows)
    stop_flag = ctx.Event()
    workers: list[_Worker] = []
    try:
        if first is not None:  # a finished run is not worth loading the model N times over
            for label, device in zip(labels, devices, strict=True):
                workers.append(_start(ctx, WorkerArgs(label, None if cpu else device, len(devices), job, plan.files,
                                                      logging.getLogger("batchvl").getEffectiveLevel(), plan.claim),
                                      stop_flag))
            log.info("started %d engine workers (%s)", len(workers), ", ".join(labels))
            _feed(workers, itertools.chain([first], chunks), stop, stop_flag, summary, counts, bar)
    finally:
        stop_flag.set()
        _shut_down(workers)
        bar.close()
        failed = any(w.failure for w in workers)
        counts.write("interrupted" if stop.signum else "failed" if failed else "finished")
    summary.committed, summary.folder = counts.this_run, counts.rows()
    summary.elapsed_s = time.perf_counter() - start
    if any(w.ready_at for w in workers):
        # Rows flow once every worker is ready: until then the run was starting processes and loading
        # models (one-offs, like load_s of a single engine), so that is what load_s counts here.
        summary.load_s = max(w.ready_at for w in workers) - start
    for w in workers:
        for stage, seconds in w.stage_s.items():  # summed over the workers
            summary.stage_s[stage] = summary.stage_s.get(stage, 0.0) + seconds
    _raise_failures(workers)
    return summary


def _start(ctx, args: WorkerArgs, stop_flag) -> _Worker:
    receive, send = ctx.Pipe(duplex=False)
    tasks = ctx.Queue()
    proc = ctx.Process(target=worker_main, args=(args, tasks, send, stop_flag), name=f"batchvl-{args.label}")
    proc.start()
    send.close()  # the worker holds the only sending end: EOF here once it is gone
    return _Worker(args.label, proc, tasks, receive)


def _feed(workers: list[_Worker], chunks: Iterator[list[tuple[Path, Row]]], stop: Stop, stop_flag,
          summary: Summary, counts: OutputCounts, bar: Progress) -> None:
    """Hand out chunks on demand and take in the workers' events until every worker has finished or died."""
    more = True
    while not all(w.done or w.exited for w in workers):
        if stop.signum:
            stop_flag.set()
        if more and not stop_flag.is_set():
            more = _hand_out(workers, chunks)
        for w in workers:
            if not w.ended and not w.exited and (not more or stop_flag.is_set() or w.failure):
                w.end()
        live = [w for w in workers if not w.exited]
        ready = set(wait([w.events for w in live] + [w.proc.sentinel for w in live], timeout=0.5))
        for w in live:
            if w.events in ready:
                _receive(w, summary, counts, bar)
            if w.proc.sentinel in ready:
                w.proc.join()
                _receive(w, summary, counts, bar)  # what it sent just before it exited
                _exited(w, bool(stop.signum))


def _hand_out(workers: list[_Worker], chunks: Iterator[list[tuple[Path, Row]]]) -> bool:
    """Top up every worker to CHUNKS_AHEAD chunks not yet taken, one chunk per worker per round, so a small
    input is shared too. Returns whether the input has more."""
    # Rows go out once every worker has loaded its engine (or failed to): the first one ready would otherwise
    # take the first rows of a small run alone. The wait is the spread of the load times, seconds.
    if not all(w.ready or w.exited or w.failure for w in workers):
        return True
    for depth in range(1, CHUNKS_AHEAD + 1):
        for w in workers:
            if w.ready and not (w.ended or w.exited or w.failure) and w.queued < depth:
                chunk = next(chunks, None)
                if chunk is None:
                    return False
                w.send(chunk)
    return True


def _receive(w: _Worker, summary: Summary, counts: OutputCounts, bar: Progress) -> None:
    """Handle every event waiting on the worker's pipe."""
    try:
        while w.events.poll():
            kind, *values = w.events.recv()
            if kind == "ready":
                w.ready, w.ready_at = True, time.perf_counter()
                summary.load_s = max(summary.load_s, values[0])
                bar.worker_ready(w.label)
            elif kind == "took":
                w.queued -= 1
            elif kind == "ran":
                rows, ok, images, tokens, errors = values
                summary.ok += ok
                summary.failed += errors
                summary.images += images
                summary.output_tokens += tokens
                bar.add(rows, images, tokens, errors, w.label)
            elif kind == "commit":
                rows, failed, examples = values
                w.committed += rows
                counts.add_committed(rows, failed, examples)
            elif kind == "times":
                w.stage_s = values[0]
            elif kind == "done":
                w.done, w.stopped_by = True, values[0]
            elif kind == "error":
                w.failure = (values[0], values[1])
                if values[0] != "job":  # a job error is raised once, as the usual one-line error
                    log.error("engine worker %s failed: %s", w.label, values[1])
    except (EOFError, OSError):  # the worker is gone, perhaps mid-message; its exit tells the rest
        pass


def _exited(w: _Worker, stopping: bool) -> None:
    """Note that the worker process has ended, and how (`stopping`: the whole run was asked to stop)."""
    w.exited = True
    code = w.proc.exitcode
    if w.done and w.stopped_by and not stopping and not w.failure:  # a signal to the worker alone
        w.failure = ("died", f"stopped by {signal.Signals(w.stopped_by).name}")
    if w.done or w.failure:
        return
    how = f"exit code {code}"
    if code is not None and code < 0:
        how += f", {signal.Signals(-code).name}"
    if stopping:  # the run is stopping anyway (a second signal ends workers at once); a rerun resumes
        log.warning("engine worker %s ended (%s) while the run was stopping", w.label, how)
        return
    w.failure = ("died", f"died ({how})")
    log.error("engine worker %s (pid %s) died (%s) holding %d uncommitted row(s); it gets no more rows", w.label,
              w.proc.pid, how, w.given - w.committed)


def _shut_down(workers: list[_Worker]) -> None:
    """End every worker: no more rows, the stop flag is set; wait for them to commit and exit, then kill."""
    for w in workers:
        if not w.exited:
            w.end()
    deadline = time.monotonic() + EXIT_GRACE_S
    for w in workers:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.proc.is_alive():
            log.error("engine worker %s did not exit; killing it", w.label)
            w.proc.kill()
            w.proc.join()
        w.tasks.cancel_join_thread()  # chunks a dead worker never took are dropped, not waited for
        w.tasks.close()
        w.events.close()


def _raise_failures(workers: list[_Worker]) -> None:
    failed = [w for w in workers if w.failure]
    if not failed:
        return
    kinds = {w.failure[0] for w in failed}
    if "job" in kinds:  # every worker meets the same problem with the job; say it once, as the job error it is
        raise JobError(next(w.failure[1] for w in failed if w.failure[0] == "job"))
    if "write" in kinds:
        raise OutputWriteError(next(w.failure[1] for w in failed if w.failure[0] == "write"))
    what = "; ".join(f"{w.label} {w.failure[1]} with {w.given - w.committed} row(s) not written" for w in failed)
    raise WorkerError(f"engine worker {what}; {len(failed)} of {len(workers)} workers failed, the others ran to the "
                      "end; rerun the same command to run the rows not written")


def _chunks(rows: Iterable[tuple[Path, Row]], size: int) -> Iterator[list[tuple[Path, Row]]]:
    chunk: list[tuple[Path, Row]] = []
    for item in rows:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
