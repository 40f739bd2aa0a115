"""A run in this process, or over the host's GPUs (one engine worker process each, `batchvl.run.gpus`):
read rows, prepare them ahead of the engine, run the engine, write the results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from batchvl.config import Job
from batchvl.core import Result
from batchvl.engine import Engine
from batchvl.engine.timing import StageTimes
from batchvl.io.shards import Shard
from batchvl.run.gpus import run_on_workers
from batchvl.run.loop import build_engine, make_preparer, process_rows
from batchvl.run.output import nothing_to_do, open_output, open_writer, plan_rows
from batchvl.run.plan import Plan
from batchvl.run.progress import Progress
from batchvl.run.signals import Stop
from batchvl.run.summary import OutputCounts, Summary

log = logging.getLogger(__name__)


def run_job(job: Job, overwrite: bool = False, progress: bool = True, sync_times: bool = False,
            retry_errors: bool = False, shard: Shard | None = None, wait: bool = False, engine: Engine | None = None,
            stopping: Callable[[], bool] | None = None,
            observe: Callable[[list[Result]], None] | None = None) -> Summary:
    """Run a job to the end (or to SIGINT/SIGTERM: `Summary.interrupted`) and return its summary.
    `sync_times` synchronises the device at each stage boundary, so the time split is exact (benchmarks); it
    costs a little throughput. `retry_errors` runs the rows whose `error` is set again. `shard` runs only the
    rows whose id the shard owns. With more than one device in `engine.gpus`, rows go to one engine worker
    process per device (batchvl.run.gpus); with one, the engine runs here, in this process. The run holds the
    output folder's lease (of its shard) throughout: another run of it is refused, or waits with `wait`.
    `engine`: run on this engine (one device; the caller owns it and closes it) instead of loading one: the
    server's Batch API runs its batches on the engine that answers its online requests. `stopping()`: asked
    before each batch besides the signals; true stops the run as SIGINT does (`Summary.stopped`). `observe(results)`:
    called with each engine batch's results once they are handed to the writer (with the engine in this process
    only, not with engine workers: `bench` times a run's steady state with it)."""
    start = time.perf_counter()
    with open_output(job, overwrite, retry_errors, shard, wait) as plan, Stop() as stop:
        log.info("plan:\n%s", plan.describe())
        devices = job.engine.devices
        if nothing_to_do(plan, shard):
            return _nothing_to_do(job, plan, start, shard)
        if observe is not None and engine is None and len(devices) > 1:
            raise ValueError("run_job: observe needs the engine in this process, not engine workers")
        if engine is not None:
            summary = _run(job, plan, stop, start, progress, sync_times, shard, engine, stopping, observe)
        elif len(devices) > 1:
            summary = run_on_workers(job, plan, devices, stop, start, progress, shard)
        else:
            if job.engine.device != "cpu" and devices[0] != 0 and torch.cuda.is_available():
                torch.cuda.set_device(devices[0])  # engine.gpus: [k], one GPU: still in this process
            summary = _run(job, plan, stop, start, progress, sync_times, shard, observe=observe)
    summary.interrupted = stop.signum
    return summary


def _nothing_to_do(job: Job, plan: Plan, start: float, shard: Shard | None) -> Summary:
    """A rerun whose rows are all written: it says so, marks the folder finished, and loads no model."""
    log.info("nothing to do: every input row%s is already in %s; the model was not loaded",
             f" of shard {shard.label}" if shard else "", job.output_dir)
    counts = OutputCounts.of(plan, start, shard)
    counts.count_todo(plan)
    counts.write("finished")
    return Summary(skipped=plan.done_rows, elapsed_s=time.perf_counter() - start, folder=counts.rows())


def _run(job: Job, plan: Plan, stop: Stop, start: float, progress: bool, sync_times: bool,
         shard: Shard | None, engine: Engine | None = None, stopping: Callable[[], bool] | None = None,
         observe: Callable[[list[Result]], None] | None = None) -> Summary:
    load_start = time.perf_counter()
    own = engine is None
    engine = build_engine(job, plan) if own else engine
    summary = Summary(skipped=plan.done_rows, load_s=time.perf_counter() - load_start)
    counts = OutputCounts.of(plan, start, shard)
    todo = counts.count_todo(plan)
    writer = open_writer(job, plan.files, counts.commit, plan.claim)
    bar = Progress(total=max(todo, 0), enabled=progress)
    times = getattr(engine, "times", None) or StageTimes()
    times.sync = sync_times

    def ran(results: list[Result]) -> None:
        if observe is not None:
            observe(results)
        for result in results:
            summary.add(result)
            bar.update(result)

    def halt() -> bool:
        summary.stopped = summary.stopped or bool(stop.signum) or (stopping is not None and stopping())
        return summary.stopped

    completed = False  # _summary.json says "failed", not "finished", when an exception ends the run
    try:
        rows = plan_rows(plan, shard)
        process_rows(job, engine, make_preparer(job, plan), rows, writer, halt, times, ran)
        completed = True
    finally:
        writer.close_after_error()
        bar.close()
        if own:
            engine.close()
        counts.write("interrupted" if summary.stopped else "finished" if completed else "failed")
    summary.committed, summary.folder = counts.this_run, counts.rows()
    summary.elapsed_s = time.perf_counter() - start
    summary.stage_s = dict(times.seconds)
    return summary
