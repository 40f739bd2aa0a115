"""The worker process of a TilePool (pool.py): tile the items its pipe brings, until the pipe closes.

Messages: it answers ("ready",) once it has mapped the pool's ring (whose descriptor comes first, over the pipe),
then reads (id, slot, bytes in the slot, TileTask) and answers (id, outcome, payload) in order: ("slot", (tiles
per image, grids)) with the tiles written into its slot, ("arrays", the Tiled arrays and grids) when they do
not fit, or ("row" | "transient", the error's text), which the pool raises as RowError or TransientError.

Workers ignore SIGINT and SIGTERM: Ctrl-C reaches the whole process group, and the main process decides
(finish the batch in flight, then close). They exit when their pipe closes or brings None: at the pool's
close(), or when the main process dies (then after the item in hand, at most).
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing.connection
import os
import signal
from dataclasses import replace
from multiprocessing import reduction
from typing import Any

import numpy as np

from batchvl.errors import RowError, TransientError
from batchvl.faults import fault_point
from batchvl.media.pixels import TileTask, tile_media

# glibc's malloc in a worker: blocks under MMAP_THRESHOLD come from the heap, and up to TRIM_THRESHOLD of freed
# heap is kept for the next image. glibc's defaults (128 KB, then adjusted as blocks are freed) give an image's
# memory back to the kernel and fault it in again for the next: a fresh process took 27 ms per 7-tile JPEG, 9 of
# them in the kernel (4,700 page faults an image); with these, 15.3 ms and 220 faults, at the same peak memory.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def work(conn: multiprocessing.connection.Connection, ring_bytes: int, slot_bytes: int) -> None:
    """A worker: tile the items its pipe brings, until the pipe closes or brings None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides what a Ctrl-C means
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _keep_freed_memory()
    ring = None
    if ring_bytes:
        fd = reduction.recv_handle(conn)
        ring = mmap.mmap(fd, ring_bytes)
        os.close(fd)
    try:
        conn.send(("ready",))
    except OSError:  # the pool is gone already
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        item_id, slot, in_slot, task = message
        start = slot * slot_bytes if slot is not None else None
        if in_slot:
            task = replace(task, blob=replace(task.blob, data=ring[start:start + in_slot]))
        answer = _tile(task, ring, start, slot_bytes)
        fault_point("tile")  # its tiles written, over the bytes it read when they came in its slot
        try:
            conn.send((item_id, *answer))
        except OSError:
            return


def _keep_freed_memory() -> None:
    """Set MMAP_THRESHOLD and TRIM_THRESHOLD, unless glibc is not there or the environment sets its own."""
    if any(k in os.environ for k in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def _tile(task: TileTask, ring: mmap.mmap | None, start: int | None, slot_bytes: int) -> tuple[str, Any]:
    """(outcome, payload): ("slot", (tiles per image, grids)) with the tiles written into the slot at `start`,
    ("arrays", the Tiled) when they do not fit, or ("row" | "transient", the error's text)."""
    in_slot = False

    def out(total: int) -> np.ndarray:
        nonlocal in_slot
        size = task.tile_size
        in_slot = ring is not None and start is not None and total * size * size * 3 <= slot_bytes
        if in_slot:
            return np.ndarray((total, size, size, 3), np.uint8, buffer=ring, offset=start)
        return np.empty((total, size, size, 3), np.uint8)

    try:
        tiled = tile_media(task, out)
    except RowError as e:
        return "row", str(e)
    except TransientError as e:
        return "transient", str(e)
    except Exception as e:  # in RowPreparer.build's own words, so a row's error reads the same from a thread
        return "row", f"internal: {type(e).__name__}: {e}"
    if in_slot:
        return "slot", ([a.shape[0] for a in tiled.arrays], tiled.grids)
    return "arrays", tiled


def ended(exitcode: int | None) -> str:
    """How a worker ended, from its exit code: `killed by SIGKILL`, `exit code 1`."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
