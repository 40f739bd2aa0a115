"""The loop every process that runs an engine shares: rows are prepared ahead, run in engine batches and
written. It reads like nano-vllm's step: take a batch of prepared requests, run the engine, hand the
results to the writer. The stages it drives are built here too, from the job and its plan.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from batchvl.config import Job
from batchvl.core import Request, Result, Row
from batchvl.engine.factory import make_engine
from batchvl.engine.timing import StageTimes
from batchvl.errors import JobError, OutputWriteError, WorkerError
from batchvl.faults import fault_point
from batchvl.host import usable_cores
from batchvl.media.fetch import FetchSettings
from batchvl.media.pool import DEPTH, TilePool
from batchvl.prepare.prefetch import Prefetcher, tile_pool
from batchvl.prepare.preparer import PrepareSettings, RowPreparer
from batchvl.prepare.prompt import PromptBuilder
from batchvl.prepare.templates import ConversationTemplate, default_system_message
from batchvl.run.output import SafeWriter, typed_input
from batchvl.run.plan import Plan, generation_params

log = logging.getLogger(__name__)


def process_rows(job: Job, engine, preparer: RowPreparer, rows: Iterable[tuple[Path, Row]], writer: SafeWriter,
                 stopping: Callable[[], bool], times: StageTimes, ran: Callable[[list[Result]], None]) -> None:
    """The loop itself: rows are prepared ahead, run in engine batches and written; `ran(results)` after each
    batch. With generation.n > 1 each prepared row runs as the samples it owes (`fan_out`). `stopping()` is asked
    before each batch. The writer is closed (its last part committed) at the end; after an error, the caller
    closes it with `close_after_error`."""
    owed: deque[tuple[int, ...] | None] = deque()  # generation.n > 1: the samples of each row taken, in order
    sampled = job.generation.n > 1
    prefetcher = make_prefetcher(job, _noting_samples(rows, owed) if sampled else rows, preparer)
    try:
        items = _timed(prefetcher, times, "media wait")
        if sampled:
            items = fan_out(items, owed, job.generation.n)
        for batch in batches_of(items, job.engine.max_batch_size, engine_rows(job), prefetcher.ready):
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


def _noting_samples(rows: Iterable[tuple[Path, Row]], owed: deque) -> Iterator[tuple[Path, Row]]:
    """`rows`, noting in `owed` the samples each one owes (None: all) as the prefetcher takes it."""
    for file, row in rows:
        owed.append(row.samples)
        yield file, row


def fan_out(items: Iterable[Request | Result], owed: deque, n: int) -> Iterator[Request | Result]:
    """generation.n > 1: each prepared row as the samples it owes. The prefetcher gives one item per row, in the
    order it took them, so the row's samples are the first ones `owed` holds (`_noting_samples` noted them
    before the item could exist). A Request becomes one Request per sample, sharing the row's prepared tiles
    and prompt ids (its media is fetched, decoded and tiled once); an error Result, one error row per sample,
    so that every (id, sample) is written exactly once whatever happened to the row."""
    for item in items:
        samples = owed.popleft()
        for k in range(n) if samples is None else samples:
            yield dataclasses.replace(item, sample=k)


def _timed(items: Iterable[Any], times: StageTimes, stage: str) -> Iterator[Any]:
    """Yield from `items`, adding the time spent waiting for each one to `stage`: host time only, as taking an item
    queues no device work (StageTimes.stage's sync)."""
    it = iter(items)
    while True:
        with times.stage(stage, sync=False):
            item = next(it, _DONE)
        if item is _DONE:
            return
        yield item


_DONE = object()


def run_batch(engine, batch: list[Request | Result]) -> list[Result]:
    """Run the requests of a batch; error results pass through. Output keeps the batch's order."""
    requests = [x for x in batch if isinstance(x, Request)]
    results = iter(_generate(engine, requests) if requests else [])
    return [next(results) if isinstance(x, Request) else x for x in batch]


_DEVICE_ERRORS = (torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()  # torch >= 2.8


def _generate(engine, requests: list[Request]) -> list[Result]:
    """engine.generate, but a batch that fails is split in halves and retried, down to one row, so that what
    one row does costs that row alone: out of device memory, a row that does not fit alone becomes an error
    row (`oom: ...`); any other exception (`Exception`, not KeyboardInterrupt or SystemExit), `internal: ...`.
    Not confined, because they are no row's doing: the job's and the output's errors, and CUDA errors, after
    which the device is unusable."""
    try:
        return engine.generate(requests)
    except torch.cuda.OutOfMemoryError:
        why = None
    except (JobError, OutputWriteError, WorkerError, *_DEVICE_ERRORS):
        raise
    except Exception as e:
        why = f"internal: {type(e).__name__}: {e}"
        if len(requests) == 1:
            log.warning("row %s failed alone; it becomes an error row", requests[0].id, exc_info=True)
        else:
            log.warning("a batch of %d rows failed (%s); retrying it in halves", len(requests), why)
    # Retried below, outside the handler: the exception's frames hold the failed attempt's tensors.
    if why is None:
        engine.out_of_memory(len(requests))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(requests) == 1:
        r = requests[0]
        why = why or (f"oom: device out of memory for this row alone ({len(r.prompt_ids)} prompt tokens, "
                      f"{sum(r.tiles_per_image)} tiles)")
        return [Result.failed(r.id, why, r.keep, r.sample)]
    half = len(requests) // 2
    if why is None:
        log.warning("device out of memory on a batch of %d rows; retrying as %d + %d", len(requests), half,
                    len(requests) - half)
    return _generate(engine, requests[:half]) + _generate(engine, requests[half:])


def batches_of(items: Iterable[Request | Result], size: int, most: int = 0,
               ready: Callable[[], bool] | None = None) -> Iterator[list[Request | Result]]:
    """Consecutive items, cut so that each batch holds `size` requests (error results ride along). With `most`
    and `ready` (refill), a batch of `size` requests goes on taking items while `ready()` says the next one
    can be had without waiting, up to `most` requests: the engine starts on the rows it has, rather than
    waiting for `most` of them, and gets more once preparation is ahead."""
    batch: list[Request | Result] = []
    requests = 0
    it = iter(items)
    for item in it:
        batch.append(item)
        requests += isinstance(item, Request)
        if requests == size:
            while ready is not None and requests < most and ready():
                more = next(it, None)
                if more is None:
                    break
                batch.append(more)
                requests += isinstance(more, Request)
            yield batch
            batch, requests = [], 0
    if batch:
        yield batch


def build_engine(job: Job, plan: Plan):
    """The engine the job names, loaded on the device this process uses."""
    return make_engine(job.engine, plan.checkpoint, plan.tokenizer, generation_params(job, plan))


SPARE_CORES = 2  # cores `media.prepare_processes: auto` leaves to the engine's process


def media_workers(job: Job, cores: int | None = None, processes: bool = True) -> tuple[int, int]:
    """(threads, worker processes) that prepare the job's media on `cores` cores (default: this host's).

    `media.prepare_processes: auto` starts all cores but SPARE_CORES as processes for a native engine on a GPU.
    The engine's thread makes many small calls, each letting the GIL go and taking it back; with decoding's Python
    and Pillow work in other processes it waits less for it. On the H200's 16-core host the 1B shape ran
    `caption-7tile` at 44.6 images/s with 14 processes against 35.6 with 16 threads, and `mixed` 16% faster
    (BENCHMARKS.md, session 8). Without a GPU the engine is the bottleneck, and threads do. Auto starts none
    unless the run began from the batchvl command: spawned processes import the main module again, and a user's
    script without `if __name__ == "__main__":` would start its run in each of them.

    Beside processes there are at least DEPTH threads per process (as the prefetcher requires): each hands one
    item to a worker and waits for it without the GIL, then tokenizes and gathers, so that every worker always
    has its next item. `processes` False: none, whatever the setting (the Python API, Ray's actors)."""
    m = job.media
    cores = cores or usable_cores()
    count = m.prepare_processes
    if count == "auto":
        count = cores - SPARE_CORES if cores > SPARE_CORES + 1 and native_on_gpu(job) and _started_by_batchvl() else 0
    count = count if processes else 0
    threads = max(m.prepare_threads, DEPTH * count) if count else m.prepare_threads or cores
    return threads, count


def native_on_gpu(job: Job) -> bool:
    """Whether the job's engine is the native one on a CUDA device."""
    return job.engine.backend == "native" and job.engine.device != "cpu" and torch.cuda.is_available()


def _started_by_batchvl() -> bool:
    """Whether this process's main module is batchvl's own (`batchvl ...`, `python -m batchvl ...`), which a
    spawned process can import again without side effects, or there is none to import (an interactive
    session). A spawned worker of such a process sees the same main module."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name.partition(".")[0] == "batchvl"
    path = getattr(main, "__file__", None)
    return path is None or Path(path).name == "batchvl"


def media_tiles(job: Job, preparer: RowPreparer, processes: bool = True) -> tuple[int, TilePool | None]:
    """The preparation threads and the worker processes (a TilePool sized for the preparer's items, or None) that
    media_workers gives the job; the caller closes the pool."""
    threads, count = media_workers(job, processes=processes)
    return threads, tile_pool(preparer.s, count) if count else None


def make_prefetcher(job: Job, rows: Iterable[tuple[Path, Row]], preparer: RowPreparer,
                    processes: bool = True) -> Prefetcher:
    """The job's prefetcher; with `processes`, its worker processes too (see media_workers), which it closes with
    itself."""
    m = job.media
    threads, tiles = media_tiles(job, preparer, processes)
    return Prefetcher(rows, preparer, job.media_root_for, max_rows=max(m.prefetch, engine_rows(job)),
                      max_bytes=m.prefetch_mb << 20, threads=threads, fetch=fetch_settings(job), tiles=tiles)


def fetch_settings(job: Job) -> FetchSettings:
    """How the job's media is fetched (HTTP timeouts and retries, the size limit, private addresses)."""
    m = job.media
    return FetchSettings(http_timeout_s=m.http_timeout_s, http_retries=m.http_retries,
                         http_concurrency=m.http_concurrency, max_media_bytes=m.max_media_mb << 20,
                         allow_private=m.allow_private_addresses)


REFILL_ROWS = 4  # with refill, the engine gets this many batches' worth of rows at once


def engine_rows(job: Job) -> int:
    """The most prepared rows the loop hands the engine at once: a batch, or with refill (native) up to several
    batches' worth (those already prepared, see batches_of), which the engine runs through one batch's slots
    as its rows finish. More rows per call keep the slots full for longer (a call's last rows drain its
    batch); they also hold more prepared media and are written (and, on SIGINT, waited for) a call at a time."""
    return job.engine.max_batch_size * (REFILL_ROWS if refills(job) else 1)


def refills(job: Job) -> bool:
    """Whether the job's engine refills finished slots: native, and `engine.refill` true, or auto and the rows may
    end at different lengths. Where every row runs to one length (generation.ignore_eos without stop strings or
    stop token ids, and no per-row limit: no max_new_tokens_column, no OpenAI batch requests) a batch's rows all
    end on the same step, so there is nothing to refill and a static batch is faster (NativeEngine decides the
    same per call, from the rows themselves: _refills)."""
    e, g, i = job.engine, job.generation, job.input
    if e.backend != "native" or e.refill is not True and e.refill != "auto":
        return False
    fixed = g.ignore_eos and not g.stop and not g.stop_token_ids and i.max_new_tokens_column is None \
        and "openai-batch" not in i.formats
    return e.refill is True or not fixed


def make_preparer(job: Job, plan: Plan) -> RowPreparer:
    ck = plan.checkpoint
    max_tiles = job.media.max_dynamic_patch or ck.max_dynamic_patch
    min_tiles = job.media.min_dynamic_patch or ck.min_dynamic_patch
    use_thumbnail = ck.use_thumbnail if job.media.use_thumbnail is None else job.media.use_thumbnail
    settings = PrepareSettings(
        prompt=job.prompt, prompt_column=job.input.prompt_column, image_column=job.input.image_column,
        max_dynamic_patch_column=job.input.max_dynamic_patch_column,
        keep_columns=tuple(job.output.keep_columns),
        keep_as_json=typed_input(job) is None,
        min_tiles=min_tiles, max_tiles=max_tiles, use_thumbnail=use_thumbnail, tile_size=ck.tile_size,
        max_prompt_tokens=ck.max_positions - job.generation.max_new_tokens,
        messages_column=job.input.messages_column, video_column=job.input.video_column,
        video_frames_column=job.input.video_frames_column, video_bound_column=job.input.video_bound_column,
        video_frames=job.media.video_frames, video_max_tiles=job.media.video_max_dynamic_patch,
        max_image_pixels=job.media.max_image_pixels,
        max_new_tokens_column=job.input.max_new_tokens_column, max_new_tokens=job.generation.max_new_tokens,
        requests=dataclasses.asdict(job.generation) if job.input.formats == {"openai-batch"} else None,
        include_prompt=job.output.include_prompt,
        pin_memory=native_on_gpu(job),
    )
    system = default_system_message(plan.template.name, ck.config) \
        if isinstance(plan.template, ConversationTemplate) else None
    return RowPreparer(settings, PromptBuilder(plan.tokenizer, plan.template, ck.tokens_per_tile, system))
