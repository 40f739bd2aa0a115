"""Preparing rows ahead of the engine: asyncio for fetching, a thread pool for CPU work, bounded memory.

A background thread runs an event loop. For each input row, in order, it takes a row slot (at most
`max_rows` rows are in flight or waiting to be consumed), plans the row, fetches its media concurrently
with every other row's, and hands decoding, tiling and tokenizing to a thread pool; with a `TilePool`
(`media.prepare_processes`), those threads hand each item's decoding and tiling on to worker processes, and
only wait for them, tokenize and gather the tiles. The consumer
iterates results in input order; taking one frees its slot and its bytes. The engine therefore never waits for
media unless the whole pipeline is slower than it.

Memory is reserved against `max_bytes` before it is taken, not counted after: each item's bytes before they
are read (their known size, or as they arrive), the decoded pixels before decoding (from the image or video
header), and the row's tiles once built. What a row holds at each step is its `RowHold`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from batchvl.core import Request, Result, Row
from batchvl.errors import RowError, TransientError
from batchvl.media import image, video
from batchvl.media.fetch import Blob, Fetcher, FetchSettings
from batchvl.media.limits import Allowance
from batchvl.media.pixels import tile_media
from batchvl.media.pool import DEPTH, TilePool
from batchvl.prepare.plan import RowPlan
from batchvl.prepare.preparer import PrepareSettings, RowPreparer

log = logging.getLogger(__name__)
_END = object()


class ByteBudget:
    """An async byte allowance, granted in row order. A request that does not fit waits, unless `urgent()` says
    the consumer is waiting for exactly this row (it must never wait behind rows that are waiting for it) or
    nothing else is held (a single row larger than the whole budget still goes through, alone).

    In row order: a request of row `seq` that would fit still waits while an earlier row waits (`try_acquire`, which
    never waits, is not ordered). Without that, every
    release woke all the waiting rows and the first to run took the bytes, whichever row it was: with many rows in
    flight (refill's four batches of 1B `mixed` rows, up to 12 tiles each, against the default 2 GB) the budget
    filled with rows far ahead of the consumer, the rows it needed next waited, and each came through alone as it
    became the urgent one: 17 to 25 s of media wait in runs of 46 to 52 s on the H200 (BENCHMARKS.md, session 10)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.wakeups = 0  # waiting requests woken to look again, whether or not they then fit (tests count them)
        self._sleepers: dict[int, tuple[int | None, Callable[[], bool], asyncio.Event]] = {}  # by a request's key
        self._keys = 0
        self._waiting: list[int] = []  # a heap of the rows (seq) waiting for bytes; a row may wait twice
        self._gone: dict[int, int] = {}  # heap entries whose wait has ended, not yet popped

    async def acquire(self, n: int, urgent: Callable[[], bool] = lambda: False, seq: int | None = None) -> None:
        if self._fits(n, urgent, seq):
            self._take(n)
            return
        key, woken = self._keys, asyncio.Event()
        self._keys += 1
        self._sleepers[key] = (seq, urgent, woken)
        if seq is not None:
            heapq.heappush(self._waiting, seq)
        try:
            while True:
                woken.clear()
                await woken.wait()
                if self._fits(n, urgent, seq):
                    break
        finally:
            del self._sleepers[key]
            if seq is not None:  # no longer waiting: if it was first in line, a later row may now go
                first = self._first_waiting() == seq
                self._gone[seq] = self._gone.get(seq, 0) + 1
                if first:
                    self._wake()
        self._take(n)

    def try_acquire(self, n: int, urgent: Callable[[], bool] = lambda: False) -> bool:
        """Take n bytes if that needs no waiting, whichever rows wait: the fetcher asks this while it streams an HTTP
        body of unknown length, and a refusal makes it drop the connection and fetch the body again later."""
        if not self._fits(n, urgent, None):
            return False
        self._take(n)
        return True

    def release(self, n: int) -> None:
        """Give bytes back (n may be 0: a nudge to re-check `urgent`)."""
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        """Wake the waiting requests that may now fit: the first row in line (each of its requests), the urgent one,
        and those of no row. A later row cannot go while an earlier one waits (`_fits`), so the rest sleep on: with
        refill's hundreds of rows waiting, waking them all on every release had each look again and sleep, a
        coroutine resumed on the loop's thread per waiting row per release, holding the GIL the engine's thread
        needs."""
        first = self._first_waiting()
        for seq, urgent, woken in self._sleepers.values():
            if not woken.is_set() and (seq is None or seq == first or urgent()):
                woken.set()
                self.wakeups += 1

    def _fits(self, n: int, urgent: Callable[[], bool], seq: int | None) -> bool:
        if self.used == 0 or urgent():
            return True
        first = self._first_waiting()
        return self.used + n <= self.limit and (seq is None or first is None or first >= seq)

    def _first_waiting(self) -> int | None:
        """The earliest row still waiting for bytes."""
        heap, gone = self._waiting, self._gone
        while heap and gone.get(heap[0], 0):
            top = heapq.heappop(heap)
            gone[top] -= 1
            if not gone[top]:
                del gone[top]
        return heap[0] if heap else None

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)


class RowHold(Allowance):
    """The bytes one row (number `seq` in input order) holds in the budget: its fetched media, then its decoded
    pixels, then its tiles."""

    def __init__(self, budget: ByteBudget, urgent: Callable[[], bool], seq: int | None = None):
        self.budget = budget
        self.urgent = urgent
        self.seq = seq
        self.held = 0

    async def reserve(self, n: int) -> None:
        await self.budget.acquire(n, self.urgent, self.seq)
        self.held += n

    def try_reserve(self, n: int) -> bool:
        if self.budget.try_acquire(n, self.urgent):
            self.held += n
            return True
        return False

    def give_back(self, n: int) -> None:
        self.held -= n
        self.budget.release(n)

    async def settle(self, n: int) -> None:
        """Hold exactly n bytes from now on."""
        if n > self.held:
            await self.reserve(n - self.held)
        else:
            self.give_back(self.held - n)


def item_bytes(item: Request | Result) -> int:
    if isinstance(item, Request) and item.tiles is not None:
        return item.tiles.numel() * item.tiles.element_size()
    return 0


GIL_SWITCH_S = 0.001  # the interpreter's switch interval while a prefetcher runs (see __init__)
SLOT_MOST_TILES = 25  # a TilePool slot holds at most this many tiles (15 MB); larger items travel pickled


def tile_pool(settings: PrepareSettings, processes: int) -> TilePool:
    """Worker processes for the prefetcher's decoding and tiling, each slot sized for the job's largest usual
    item: an image at its most tiles with its thumbnail, or a video's frames."""
    def tiles(most: int) -> int:
        return most + (1 if settings.use_thumbnail and most > 1 else 0)

    usual = max(tiles(settings.max_tiles), settings.video_frames * tiles(settings.video_max_tiles)
                if settings.video_column else 0)
    return TilePool(processes, min(usual, SLOT_MOST_TILES) * settings.tile_size ** 2 * 3)


class Prefetcher:
    """Iterate prepared rows (Request or error Result) in input order, prepared ahead in the background.
    `tiles`: worker processes that decode and tile instead of the threads; the prefetcher closes them with
    itself."""

    def __init__(self, rows: Iterable[tuple[Path, Row]], preparer: RowPreparer,
                 media_root_for: Callable[[Path], Path | str], max_rows: int = 64, max_bytes: int = 2 << 30,
                 threads: int = 4, fetch: FetchSettings | None = None, tiles: TilePool | None = None):
        self.tiles = tiles
        self._tile = tiles.tile if tiles is not None else tile_media
        if tiles is not None:  # each thread waits for one item at a time: enough to keep every worker's hands full
            threads = max(threads, DEPTH * tiles.processes)
        self.rows = iter(rows)
        self.preparer = preparer
        self.media_root_for = media_root_for
        self.max_rows = max(1, max_rows)
        self.max_bytes = max_bytes
        self.fetch_settings = fetch or FetchSettings()
        self._budget: ByteBudget | None = None
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="batchvl-prepare")
        self._out: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop = False
        # The preparation threads hold the GIL in Pillow/numpy glue; each time the consumer (the engine's
        # thread) lets go of it, around every CUDA sync and many torch calls, it may wait a whole switch
        # interval (5 ms by default) to get it back. 1 ms keeps the GPU fed. Restored by close().
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, GIL_SWITCH_S))
        self._thread = threading.Thread(target=self._run, name="batchvl-prefetch", daemon=True)
        self._thread.start()
        self._ready.wait()

    @property
    def peak_bytes(self) -> int:
        """The most bytes held at once (for tests and the log)."""
        return self._budget.peak if self._budget is not None else 0

    # ---- consumer side (the caller's thread) ------------------------------------------------------------

    def __iter__(self) -> Iterator[Request | Result]:
        while True:
            got = self._out.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            item, held = got.result()
            if not self._loop.is_closed():  # once the producer has finished, nothing waits for a release
                try:
                    self._loop.call_soon_threadsafe(self._release, held)
                except RuntimeError:  # it closed in between
                    pass
            yield item

    def ready(self) -> bool:
        """Whether the next item can be taken without waiting: the end of the rows or an error counts as ready
        (taking it does not wait either). For callers that take more rows only when they are there."""
        with self._out.mutex:
            if not self._out.queue:
                return False
            head = self._out.queue[0]
        return not isinstance(head, concurrent.futures.Future) or head.done()

    def close(self) -> None:
        self._stop = True
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._cancel_all)
        self._thread.join(timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.tiles is not None:  # after the threads' queue is cancelled: the builds still waiting fail fast
            self.tiles.close()
        sys.setswitchinterval(self._switch_interval)

    # ---- producer side (the loop thread) ----------------------------------------------------------------

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._produce())
        except asyncio.CancelledError:
            pass
        finally:
            self._loop.close()

    async def _produce(self) -> None:
        self._slots = asyncio.Semaphore(self.max_rows)
        self._budget = ByteBudget(self.max_bytes)
        self._fetcher = Fetcher(self.fetch_settings)
        self._tasks: set[asyncio.Task] = set()
        self._submitted = 0  # rows handed to tasks so far
        self._consumed = 0  # rows the consumer has taken: the row it waits for is number _consumed
        self._ready.set()
        failure: BaseException | None = None
        try:
            while not self._stop:
                await self._slots.acquire()
                try:
                    file, row = next(self.rows)
                except StopIteration:
                    break
                except BaseException as e:  # the input itself failed (an unreadable file; a
                    failure = e  # KeyboardInterrupt or SystemExit met in this thread): the run stops, loudly,
                    break  # in the consumer's thread, once the rows before it are prepared
                result: concurrent.futures.Future = concurrent.futures.Future()
                self._out.put(result)
                task = asyncio.create_task(self._prepare(file, row, self._submitted, result))
                self._submitted += 1
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if failure is not None:  # after the rows before it, which the consumer still gets
                self._out.put(failure)
        finally:
            await self._fetcher.close()
            self._out.put(_END)

    async def _prepare(self, file: Path, row: Row, seq: int, result: concurrent.futures.Future) -> None:
        hold = RowHold(self._budget, lambda: self._consumed == seq, seq)
        try:
            plan = self.preparer.plan(row, self.media_root_for(file))
            if isinstance(plan, Result):
                result.set_result((plan, 0))
                return
            item = await self._fetch_and_build(plan, hold)
            result.set_result((item, hold.held))
        except BaseException as e:  # never leave the consumer waiting
            if hold.held:
                hold.give_back(hold.held)
            if not result.done():
                if isinstance(e, TransientError):  # the machine's, not the row's: the consumer raises it
                    result.set_exception(e)
                else:
                    result.set_result((Result.failed(row.id, f"internal: {type(e).__name__}: {e}"), 0))
            if isinstance(e, asyncio.CancelledError):
                raise

    async def _fetch_and_build(self, plan: RowPlan, hold: RowHold) -> Request | Result:
        loop = asyncio.get_running_loop()
        try:
            blobs = await self._fetch_all(plan, hold)
            # Decoded pixels are reserved before decoding, from the headers, like fetched bytes before reading.
            decoded = await loop.run_in_executor(None, self._decoded_size, plan, blobs)
        except RowError as e:
            hold.give_back(hold.held)  # what the row's other items fetched is dropped with it
            return Result.failed(plan.row.id, str(e), plan.keep)
        await hold.reserve(decoded)
        item = await loop.run_in_executor(self.pool, self.preparer.build, plan, blobs, self._tile)
        del blobs  # the fetched bytes and the decoded pixels are gone once built: the row now holds its tiles
        await hold.settle(item_bytes(item))
        return item

    async def _fetch_all(self, plan: RowPlan, hold: RowHold) -> list[Blob]:
        tasks = [asyncio.ensure_future(self._fetcher.fetch(m.ref, plan.media_root, read_local=m.kind != "video",
                                                           allowance=hold)) for m in plan.media]
        try:
            return await asyncio.gather(*tasks)
        finally:  # after one failure the others stop too, and give back what they reserved
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _decoded_size(self, plan: RowPlan, blobs: list[Blob]) -> int:
        total = 0
        for item, blob in zip(plan.media, blobs, strict=True):
            if item.kind == "video":
                total += video.decoded_size(blob, item.frames)
            else:
                total += image.decoded_size(blob.data, blob.name, self.preparer.s.max_image_pixels)
        return total

    def _release(self, held: int) -> None:
        self._consumed += 1
        self._slots.release()
        self._budget.release(held)  # also wakes the row the consumer now waits for

    def _cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._slots.release()  # wake the producer if it waits for a slot


