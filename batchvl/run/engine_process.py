"""The native engine in a process of its own (engine.separate_process), fed by the run's process.

Why. The engine's thread issues thousands of small host calls per batch: a decode step is a graph replay and
about twenty tensor operations, prefill and the vision pass hundreds more. Each torch call lets go of the GIL
and takes it back, and while media preparation's threads (reading files, tokenizing, waiting for the tile
workers, the asyncio fetch loop) are runnable, taking it back can wait out a thread's whole switch interval. On
the H200 the 1B engine alone ran caption-7tile at 61.5 images/s, and 14.1 beside 14 busy Python threads (decode
1.5 s against 19.9; `docs/gpu-checks/engine_probe.py`); the pipeline ran 36. In a process of its own, the
engine's thread is the only one that wants its GIL, as vLLM's engine core is.

How. `EngineProcess` is an Engine whose `generate` sends the batch to a spawned child and waits for the results.
The child plans the model from the job itself and builds the engine the job names (batchvl.run.loop.build_engine).
Tiles travel through one shared-memory buffer (a memfd, as the tile pool's ring: no /dev/shm name, no size
bound from Docker's /dev/shm): the parent copies the batch's tiles into it and sends the requests without their
tiles, with each one's place in it; the child's requests view it. A call waits for its answer, so the buffer is
free again when `generate` returns; it grows (a new memfd, passed to the child) when a batch needs more.

What crosses back: the results, the child's stage times (added to this engine's `times`) and its device memory
peak. Out of device memory is raised here as torch.cuda.OutOfMemoryError, so the run's halving retry works as in
one process (`out_of_memory` is forwarded); a JobError is raised as one; any other exception of a batch as
RuntimeError, confined to the batch by the run loop as in one process. A device error, or the child's death, is
a WorkerError: the run stops, and a rerun resumes. The child ignores SIGINT (the run's process finishes the batch
in flight and then closes it) and exits when the run's process dies.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import signal
import traceback
from multiprocessing import reduction

import torch

from batchvl.config import Job
from batchvl.core import Request, Result
from batchvl.engine.base import Engine, GenerationParams
from batchvl.engine.timing import StageTimes
from batchvl.errors import JobError, WorkerError
from batchvl.faults import fault_point, set_process_label
from batchvl.log import configure_logging

log = logging.getLogger(__name__)

_DEVICE_ERRORS = (torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()  # torch >= 2.8
START_BYTES = 64 << 20  # the tiles buffer's first size; it grows to the largest batch's tiles


def wants_engine_process(job: Job) -> bool:
    """Whether a single-process run puts its engine in a process of its own: engine.separate_process true, or
    auto with the native backend on a CUDA device."""
    e = job.engine
    if e.separate_process == "auto":
        return e.backend == "native" and e.device != "cpu" and torch.cuda.is_available()
    return bool(e.separate_process)


class EngineProcess(Engine):
    """The job's engine, run in a spawned child process (see the module docstring)."""

    def __init__(self, job: Job, log_level: int):
        ctx = multiprocessing.get_context("spawn")  # never fork: torch and CUDA threads may be running
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, job, log_level), name="batchvl-engine",
                                 daemon=True)
        self._proc.start()
        child.close()
        self.times = StageTimes()
        self.device_peak_bytes = 0
        self._buffer: torch.Tensor | None = None  # [bytes] uint8, this process's view of the shared memfd
        self._mapping: mmap.mmap | None = None
        self.max_batch_size = self._call("ready")[0]

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run `requests` in the child; results keep their order."""
        unique: dict[int, int] = {}  # id(tiles) -> its place: a row's samples share one tiles tensor
        blocks: list[torch.Tensor] = []
        for r in requests:
            if r.tiles is not None and id(r.tiles) not in unique:
                unique[id(r.tiles)] = len(blocks)
                blocks.append(r.tiles)
        places, offset = [], 0
        for t in blocks:
            places.append((offset, tuple(t.shape)))
            offset += t.numel()
        self._room(offset)
        for t, (start, _) in zip(blocks, places, strict=True):  # [T, S, S, 3] uint8 each, into the shared buffer
            self._buffer[start : start + t.numel()].view(t.shape).copy_(t)
        metas = [(dataclasses.replace(r, tiles=None), None if r.tiles is None else unique[id(r.tiles)])
                 for r in requests]
        results, seconds, peak = self._call("generate", metas, places, self.times.sync)
        for stage, s in seconds.items():
            self.times.seconds[stage] += s
        self.device_peak_bytes = max(self.device_peak_bytes, peak)
        return results

    def set_params(self, params: GenerationParams) -> None:
        """Use `params` for the next batches (in the child)."""
        self.params = params
        self._call("params", params)

    def out_of_memory(self, rows: int) -> None:
        """Forwarded: the child's engine sizes itself down (and says to how many rows a batch)."""
        self.max_batch_size = self._call("oom", rows)[0]

    def close(self) -> None:
        """Close the child's engine and wait for the child to exit."""
        if self._proc.is_alive():
            try:
                self._call("close")
            except WorkerError:
                pass
        self._proc.join(timeout=60)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()

    def _room(self, size: int) -> None:
        """A shared buffer of at least `size` bytes, in this process and the child."""
        if self._buffer is not None and self._buffer.numel() >= size:
            return
        size = max(size + size // 4, START_BYTES)
        fd = os.memfd_create("batchvl-engine-tiles")
        try:
            os.ftruncate(fd, size)
            self._mapping = mmap.mmap(fd, size)
            self._buffer = torch.frombuffer(self._mapping, dtype=torch.uint8)
            self._conn.send(("buffer", size))
            reduction.send_handle(self._conn, fd, self._proc.pid)
        finally:
            os.close(fd)  # the mappings keep the memory; the kernel frees it with the last one
        self._answer()

    def _call(self, kind: str, *args):
        if kind != "ready":
            self._send((kind, *args))
        return self._answer()

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as e:
            raise self._died() from e

    def _answer(self) -> tuple:
        try:
            kind, *values = self._conn.recv()
        except (EOFError, ConnectionResetError, OSError) as e:
            raise self._died() from e
        if kind == "ok":
            return tuple(values)
        text = values[0]
        if kind == "oom":
            raise torch.cuda.OutOfMemoryError(text)
        if kind == "job":
            raise JobError(text)
        if kind == "batch":
            raise RuntimeError(text)
        raise WorkerError(f"the engine process failed: {text}")

    def _died(self) -> WorkerError:
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return WorkerError(f"the engine process died ({how}); rerun the same command to resume")


def _child_main(conn: multiprocessing.connection.Connection, job: Job, log_level: int) -> None:
    """The engine process: plan the model, build the engine, then answer the parent's calls until `close`."""
    from batchvl.run.loop import build_engine  # here, not at the top: loop imports this module
    from batchvl.run.plan import plan_model
    from batchvl.run.worker import exit_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run's process decides when to stop
    exit_with_parent()  # its batch in flight is then not written, and a rerun runs it again
    configure_logging(log_level, "engine")
    set_process_label("engine")

    try:
        engine = build_engine(job, plan_model(job))
    except JobError as e:
        conn.send(("job", str(e)))
        return
    except Exception as e:
        log.error("%s", traceback.format_exc())
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", engine.max_batch_size))
    buffer = None
    try:
        while True:
            kind, *args = conn.recv()
            if kind == "close":
                conn.send(("ok",))
                return
            if kind == "buffer":
                fd = reduction.recv_handle(conn)
                buffer = _pinned(torch.frombuffer(mmap.mmap(fd, args[0]), dtype=torch.uint8), buffer)
                os.close(fd)
                conn.send(("ok",))
            elif kind == "generate":
                conn.send(_generate(engine, buffer, *args))
            elif kind == "oom":
                engine.out_of_memory(args[0])
                conn.send(("ok", engine.max_batch_size))
            elif kind == "params":
                engine.set_params(args[0])
                conn.send(("ok",))
    finally:
        engine.close()


def _generate(engine, buffer: torch.Tensor | None, metas, places, sync: bool) -> tuple:
    """One `generate` call in the child: the requests get their tiles back as views of the shared buffer."""
    blocks = [buffer[start : start + _numel(shape)].view(shape) for start, shape in places]
    requests = [r if block is None else dataclasses.replace(r, tiles=blocks[block]) for r, block in metas]
    times = getattr(engine, "times", None)
    before = dict(times.seconds) if times is not None else {}
    if times is not None:
        times.sync = sync
    fault_point("engine")
    try:
        results = engine.generate(requests)
    except torch.cuda.OutOfMemoryError as e:
        return ("oom", str(e))
    except JobError as e:
        return ("job", str(e))
    except _DEVICE_ERRORS as e:
        return ("fatal", f"{type(e).__name__}: {e}")
    except Exception as e:
        log.warning("a batch failed in the engine process", exc_info=True)
        return ("batch", f"{type(e).__name__}: {e}")
    seconds = {k: v - before.get(k, 0.0) for k, v in times.seconds.items()} if times is not None else {}
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    return ("ok", results, seconds, peak)


def _pinned(buffer: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """`buffer`, page-locked for CUDA when there is a GPU (cudaHostRegister): the engine then copies each row's
    tiles straight from it, asynchronously, as from the preparer's pinned tensors in one process. `old`, the
    buffer it replaces, is unregistered (no view of it outlives the call that used it)."""
    if not torch.cuda.is_available():
        return buffer
    cudart = torch.cuda.cudart()
    if old is not None and old.is_pinned():
        cudart.cudaHostUnregister(old.data_ptr())
    if int(cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)) != 0:
        log.warning("the engine's tiles buffer could not be page-locked: tiles are copied through a staging buffer")
    return buffer


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


