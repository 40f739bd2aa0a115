"""One engine worker process of a run over several devices (the coordinator is batchvl.run.gpus).

A worker owns one device and its own model copy. It takes chunks of raw input rows from its task queue,
prepares their media itself (so media work grows with the number of workers; no tiles cross processes),
runs them through the same loop as a single-process run (`batchvl.run.loop.process_rows`) and commits its own part
files, named after it (`part-...-gpu1-00000.parquet`). It tells the coordinator, over its event pipe, when it
is ready, each chunk it takes, each batch it ran and each part it committed.

It stops before its next batch when the coordinator asks (a shared event) or on its own SIGINT/SIGTERM, and
then commits what it has finished. If the coordinator dies it exits at once without committing more, so a
rerun can never race with it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from batchvl.config import Job
from batchvl.core import Row
from batchvl.engine.timing import StageTimes
from batchvl.errors import JobError, OutputWriteError
from batchvl.faults import set_process_label
from batchvl.host import usable_cores
from batchvl.io.lease import Claim
from batchvl.log import configure_logging
from batchvl.run.loop import build_engine, make_preparer, media_workers, process_rows
from batchvl.run.output import open_writer
from batchvl.run.plan import plan_model
from batchvl.run.signals import Stop
from batchvl.run.summary import failed_by_kind, failed_examples

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_ORPHANED = 3  # the coordinator died


@dataclass
class WorkerArgs:
    """What a worker process is started with (pickled to it)."""

    label: str
    device: int | None  # the CUDA ordinal as the coordinator sees it; None for a CPU worker
    workers: int  # how many workers share the host (CPU threads are split between them)
    job: Job
    files: list[Path]
    log_level: int
    claim: Claim  # the run's lease of the output folder, checked before each commit


def worker_main(args: WorkerArgs, tasks: multiprocessing.Queue, events, stop_flag) -> None:
    """The worker process: pin the device, load the engine, run chunks until told there are no more.
    `tasks` holds lists of (input file, Row), then None; `events` is the sending end of the event pipe;
    `stop_flag` is set when the coordinator stops the run. Exits 0 when done, 1 after reporting a failure."""
    if args.device is not None:
        _pin_gpu(args.device)
    set_process_label(args.label)
    _exit_with_parent()
    send = _Events(events)
    with Stop(quiet=True) as stop:
        try:
            configure_logging(args.log_level, args.label)
            _work(args, tasks, send, lambda: bool(stop.signum) or stop_flag.is_set())
            send("done", stop.signum)
            return
        except JobError as e:
            send("error", "job", str(e))
        except OutputWriteError as e:
            send("error", "write", str(e))
        except Exception as e:
            log.error("%s", traceback.format_exc())
            send("error", "crash", f"{type(e).__name__}: {e}")
    raise SystemExit(EXIT_FAILED)


def _work(args: WorkerArgs, tasks: multiprocessing.Queue, send: _Events, stopping) -> None:
    job = args.job
    share = max(1, usable_cores() // args.workers)
    if args.device is None:
        torch.set_num_threads(share)  # CPU workers: one share of the cores each, not all of them each
    # This worker's share of the cores, not the host's, for its media threads and processes.
    job.media.prepare_threads, job.media.prepare_processes = media_workers(job, cores=share)
    load_start = time.perf_counter()
    plan = plan_model(job)
    plan.files = args.files
    engine = build_engine(job, plan)
    try:
        send("ready", time.perf_counter() - load_start)
        writer = open_writer(job, args.files,
                             lambda rs: send("commit", len(rs), failed_by_kind(rs), failed_examples(rs)), args.claim,
                             args.label)
        times = getattr(engine, "times", None) or StageTimes()

        def ran(results) -> None:
            ok = [r for r in results if r.error is None]
            send("ran", len(results), len(ok), sum(r.images for r in ok), sum(r.output_tokens for r in ok),
                 len(results) - len(ok))

        try:
            process_rows(job, engine, make_preparer(job, plan), _chunked_rows(tasks, send, stopping), writer,
                         stopping, times, ran)
        finally:
            writer.close_after_error()
        send("times", dict(times.seconds))
    finally:
        engine.close()


def _chunked_rows(tasks: multiprocessing.Queue, send: _Events, stopping) -> Iterator[tuple[Path, Row]]:
    """The rows of each chunk the coordinator sends, until it sends None (or the run stops). Runs on the
    prefetcher's thread, which asks for rows as fast as preparation frees room: taking a chunk is the demand
    the coordinator answers with the next one."""
    while not stopping():
        try:
            chunk = tasks.get(timeout=0.5)
        except queue.Empty:
            continue
        if chunk is None:
            return
        send("took", len(chunk))
        yield from chunk


class _Events:
    """The sending end of the event pipe, shared by the loop thread and the prefetcher's thread."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()

    def __call__(self, kind: str, *values) -> None:
        with self.lock:
            self.conn.send((kind, *values))


def _pin_gpu(device: int) -> None:
    """Show this process only its own GPU, before anything touches CUDA, so the engine's `cuda` is that GPU
    and no memory is taken on the others. `device` counts in the coordinator's view, which may itself be
    narrowed by CUDA_VISIBLE_DEVICES."""
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised before the worker picked its GPU")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else None
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[device] if ids else str(device)


def _exit_with_parent() -> None:
    """Exit at once when the coordinator dies: nothing more is committed, so a rerun never races with us."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="batchvl-parent-watch", daemon=True).start()
