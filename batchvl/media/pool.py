"""Decoding and tiling in worker processes, so that the GIL of the process that drives the GPU stays free.

`TilePool(n, slot_bytes)` starts n worker processes. `tile(task, out)`, called from a preparation thread, blocks
that thread (without the GIL) until a worker has run `tile_media(task)`, and returns the same arrays (in `out`'s
memory when given), or raises the same RowError or TransientError, as `tile_media(task, out)` in the thread
would: both paths run that one function.

Workers are spawned, never forked: a fork after torch or CUDA has started threads is unsafe. They import numpy,
Pillow and batchvl.media, not torch (see tiling.py), and took 0.15 to 0.3 s to start here (`bench-media` prints
it).

How bytes travel. The pool maps one shared-memory object, a ring of `DEPTH x n` slots of `slot_bytes`, into
itself and every worker. It is a memfd, not a /dev/shm name: nothing can be left behind in /dev/shm whoever
is killed, Docker's 64 MB /dev/shm does not bound it, and the kernel frees it with its last mapping. A caller
takes a free slot, copies the item's fetched bytes into it and queues a small message; the worker reads the
bytes, tiles straight into the same slot and answers with the tile counts; the caller copies the tiles to
where they are used (`out`: the row's tensor, page-locked on CUDA) and frees the slot. Bytes or tiles that do
not fit a slot (an item past the job's usual tile count) travel pickled through the worker's pipe instead, and
an item whose bytes go that way is only sent to an idle worker, so that the pool's thread never waits in a
send behind another item's decode.
Measured against pickling both ways through the pipes (`bench-media --pipes`, 200 7-tile JPEGs, 2 cores,
2026-12-01): with 2 processes the ring gave 111 images/s and 2.7 ms of the main process's CPU per image, the
pipes 96 images/s and 3.4 ms; with 1 process 71 and 2.1 ms against 54 and 3.9 ms (mixed photos: 24.9 against
22.1 images/s, 3.3 against 4.8 ms). Reruns moved the rates by 15%, never the order.

Workers that die. A worker holds at most DEPTH items: one in hand, the next waiting in its pipe, so that it
need not wait for the main process between items. A worker that dies (killed, out of memory, a crash in a
decoder) is replaced by a new one; the item in its hands is tried again, and the one waiting behind it goes
back to the queue as it was. An item whose worker died ATTEMPTS times becomes its row's error (`media: a
preparation process died 2 times while preparing NAME (killed by SIGKILL)`): it is what kills them, most
likely. START_FAILURES workers in a row that die before they are ready break the pool: every call then raises
TransientError, and the run stops with that message.

What a worker does, and how it stops, is in pool_worker.py.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from multiprocessing import reduction
from typing import Any

import numpy as np

from batchvl.errors import RowError, TransientError
from batchvl.media.pixels import Out, Tiled, TileTask, place_tiles, split_tiles
from batchvl.media.pool_worker import ended, work

log = logging.getLogger(__name__)

DEPTH = 2  # items a worker holds at once: one in hand, one waiting in its pipe
ATTEMPTS = 2  # times an item may see its worker die; then it is its row's error
START_FAILURES = 3  # workers in a row that die before they are ready: the pool is broken
CLOSE_WAIT_S = 1.0  # how long close() lets workers exit before it kills them (one may be mid-item)
SHARED_MEMORY = hasattr(os, "memfd_create")  # Linux; elsewhere every item travels through the pipes


@dataclass(eq=False)
class _Item:
    task: TileTask  # its blob's bytes are None when they wait in the slot
    future: Future
    slot: int | None
    data: bytes | None = None  # the bytes copied into the slot, to copy again for a retry (tiles overwrite them)
    id: int = 0
    attempts: int = 0

    @property
    def inline(self) -> bool:
        """Its bytes ride in the message itself (pickled)."""
        return self.task.blob.data is not None


@dataclass(eq=False)
class _Worker:
    process: Any  # multiprocessing's SpawnProcess
    conn: multiprocessing.connection.Connection
    items: deque[_Item] = field(default_factory=deque)  # sent, not yet answered, in the order sent
    ready: bool = False
    dead: bool = False


class TilePool:
    """`processes` worker processes that decode and tile media items; see the module's docstring.
    Thread-safe: any number of preparation threads call `tile` at once."""

    def __init__(self, processes: int, slot_bytes: int):
        """`slot_bytes`: one slot of the ring; 0 sends every item's bytes and tiles pickled through the pipes."""
        if processes < 1:
            raise ValueError(f"TilePool: processes must be >= 1, got {processes}")
        self.processes = processes
        self.slot_bytes = slot_bytes if SHARED_MEMORY else 0
        self.restarts = 0  # workers that died and were replaced
        self._ctx = multiprocessing.get_context("spawn")
        slots = DEPTH * processes if self.slot_bytes else 0
        self._ring_bytes = slots * self.slot_bytes
        self._free = list(range(slots))
        self._queue: deque[_Item] = deque()  # items waiting for a worker
        self._cond = threading.Condition()  # guards _free, _queue, _closed, _broken and the wake pipe
        self._closed = False
        self._broken: str | None = None
        self._next_id = 0
        self._start_failures = 0
        self._workers: list[_Worker] = []
        self._fd: int | None = None
        self._ring: mmap.mmap | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        try:
            if self._ring_bytes:
                self._fd = os.memfd_create("batchvl-tiles", os.MFD_CLOEXEC)
                os.ftruncate(self._fd, self._ring_bytes)
                self._ring = mmap.mmap(self._fd, self._ring_bytes)
            for _ in range(processes):
                self._workers.append(self._start_worker())
            self._thread = threading.Thread(target=self._serve, name="batchvl-tile-pool", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    # ---- callers (preparation threads) --------------------------------------------------------------------

    def tile(self, task: TileTask, out: Out | None = None) -> Tiled:
        """`tile_media(task, out)`, run by a worker process: one uint8 array [T, S, S, 3] per image, and its grid."""
        slot = self._take_slot()
        try:
            item = _Item(task, Future(), slot)
            data = task.blob.data
            if slot is not None and data is not None and len(data) <= self.slot_bytes:
                start = slot * self.slot_bytes
                self._ring[start:start + len(data)] = data
                item.task = replace(task, blob=replace(task.blob, data=None))
                item.data = data
            with self._cond:
                self._check_open()
                item.id = self._next_id
                self._next_id += 1
                self._queue.append(item)
                self._wake()
            outcome, payload = item.future.result()
            if outcome == "slot":
                counts, grids = payload
                return Tiled(self._copy_out(counts, slot, task.tile_size, out), grids)
            if out is None:
                return payload
            return Tiled(place_tiles(payload.arrays, out), payload.grids)
        finally:
            if slot is not None:
                with self._cond:
                    self._free.append(slot)
                    self._cond.notify()

    def _take_slot(self) -> int | None:
        with self._cond:
            while not self._free and not self._closed and self._broken is None and self._ring_bytes:
                self._cond.wait()
            self._check_open()
            return self._free.pop() if self._ring_bytes else None

    def _copy_out(self, counts: list[int], slot: int, size: int, out: Out | None) -> list[np.ndarray]:
        """The tiles a worker wrote into `slot`, copied out (into `out`'s memory) so that the slot is free again."""
        total = sum(counts)
        view = np.frombuffer(self._ring, np.uint8, total * size * size * 3, slot * self.slot_bytes)
        into = out(total) if out is not None else np.empty((total, size, size, 3), np.uint8)
        np.copyto(into, view.reshape(total, size, size, 3))
        del view  # an export of the ring would stop close() from unmapping it
        return split_tiles(into, counts)

    def _check_open(self) -> None:
        if self._broken is not None:
            raise TransientError(f"media: {self._broken}; the run stops (rerun to resume)")
        if self._closed:
            raise RuntimeError("media: the preparation processes are closed")

    def _wake(self) -> None:
        """Wake the pool's thread (the caller holds _cond, which keeps the pipe open meanwhile)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    # ---- for bench-media, the log and the tests -------------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every worker has started; False on timeout, or when the pool is broken or closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._broken is not None or
                                sum(w.ready for w in self._workers) == self.processes, timeout)
            return not self._closed and self._broken is None and \
                sum(w.ready for w in self._workers) == self.processes

    def workers(self) -> list[tuple[int, int]]:
        """(pid, items held) of each live worker."""
        with self._cond:
            return [(w.process.pid, len(w.items)) for w in self._workers if not w.dead]

    # ---- the pool's thread: answers, deaths, dispatch ---------------------------------------------------------

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe()  # duplex: a socket pair, which can carry the ring's descriptor
        process = self._ctx.Process(target=work, args=(child, self._ring_bytes, self.slot_bytes),
                                    name="batchvl-tiles", daemon=True)
        process.start()
        child.close()
        if self._fd is not None:
            try:
                reduction.send_handle(parent, self._fd, process.pid)
            except OSError:  # it ended already: seen by _serve, as any worker that ends before it is ready
                pass
        return _Worker(process, parent)

    def _serve(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._closed:
                        break
                    watched: dict[Any, _Worker | None] = {self._wake_r: None}
                    for w in self._workers:
                        watched[w.conn] = w
                        watched[w.process.sentinel] = w
                for ready in multiprocessing.connection.wait(list(watched)):
                    w = watched[ready]
                    if w is None:
                        os.read(self._wake_r, 4096)
                    elif not w.dead and ready is w.conn:
                        self._receive(w)
                    elif not w.dead:
                        self._bury(w)
                self._dispatch()
        except BaseException as e:  # a bug here must not leave callers waiting forever
            log.exception("media: the preparation processes' thread failed")
            with self._cond:
                self._broken = f"the preparation processes failed ({type(e).__name__}: {e})"
        finally:
            self._fail_all()

    def _receive(self, w: _Worker) -> None:
        try:
            message = w.conn.recv()
        except (EOFError, OSError):  # it is dying: what it held is settled by _bury
            self._bury(w)
            return
        self._answer(w, message)

    def _answer(self, w: _Worker, message: tuple) -> None:
        if message[0] == "ready":
            with self._cond:
                w.ready = True
                self._start_failures = 0
                self._cond.notify_all()
            return
        item_id, outcome, payload = message
        item = w.items.popleft()
        assert item.id == item_id, (item.id, item_id)  # a worker answers in the order it was sent items
        if outcome == "row":
            item.future.set_exception(RowError(payload))
        elif outcome == "transient":
            item.future.set_exception(TransientError(payload))
        else:
            item.future.set_result((outcome, payload))

    def _bury(self, w: _Worker) -> None:
        """A worker ended: its answers sent before count, its items go back or fail, a new worker replaces it."""
        try:
            while w.conn.poll():
                self._answer(w, w.conn.recv())
        except (EOFError, OSError):
            pass
        w.process.join(CLOSE_WAIT_S)
        if w.process.is_alive():  # it closed its pipe yet lives on: it is of no use any more
            w.process.kill()
            w.process.join()
        how = ended(w.process.exitcode)
        w.conn.close()
        broken = False
        with self._cond:
            w.dead = True
            self._workers.remove(w)
            if self._closed:
                return
            back = list(w.items)
            if back:
                back[0].attempts += 1  # the one in its hands: it may be what killed it
                if back[0].attempts >= ATTEMPTS:
                    first = back.pop(0)
                    first.future.set_exception(RowError(
                        f"media: a preparation process died {ATTEMPTS} times while preparing {first.task.name} "
                        f"({how})"))
                for item in back:  # the dead worker may have written tiles over their bytes
                    if item.data is not None:
                        start = item.slot * self.slot_bytes
                        self._ring[start:start + len(item.data)] = item.data
                self._queue.extendleft(reversed(back))
            if not w.ready:
                self._start_failures += 1
                if self._start_failures >= START_FAILURES:
                    self._broken = f"preparation processes cannot start: {START_FAILURES} ended before ready ({how})"
                    broken = True
        if broken:
            self._fail_all()
            return
        log.warning("media: preparation process %d ended (%s) holding %d item(s); a new one takes its place",
                    w.process.pid, how, len(w.items))
        self.restarts += 1
        replacement = self._start_worker()
        with self._cond:
            self._workers.append(replacement)

    def _dispatch(self) -> None:
        """Send queued items to ready workers, the least busy first, in queue order."""
        while True:
            with self._cond:
                if not self._queue:
                    return
                item = self._queue[0]
                room = 1 if item.inline else DEPTH  # pickled bytes: only a worker that reads them at once
                free = [w for w in self._workers if w.ready and not w.dead and len(w.items) < room]
                if not free:
                    return
                w = min(free, key=lambda w: len(w.items))
                self._queue.popleft()
            try:
                w.conn.send((item.id, item.slot, 0 if item.data is None else len(item.data), item.task))
            except OSError:  # it died: _bury settles it once its sentinel is seen
                with self._cond:
                    self._queue.appendleft(item)
                    w.ready = False
                continue
            w.items.append(item)

    def _fail_all(self) -> None:
        with self._cond:
            items = list(self._queue) + [i for w in self._workers for i in w.items]
            self._queue.clear()
            for w in self._workers:
                w.items.clear()
            error = TransientError(f"media: {self._broken}; the run stops (rerun to resume)") \
                if self._broken is not None else RuntimeError("media: the preparation processes are closed")
            self._cond.notify_all()
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    # ---- closing ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers (those still mid-item after CLOSE_WAIT_S are killed) and unmap the ring. Items in
        flight fail (RuntimeError). Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._wake()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + CLOSE_WAIT_S
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()
        with self._cond:
            self._workers.clear()
            if self._ring is not None:
                try:
                    self._ring.close()
                except BufferError:  # a caller still copies out of it: the mapping goes with its last view
                    pass
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.close(self._wake_r)
            os.close(self._wake_w)

    def __enter__(self) -> TilePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
