"""The native engine's vision pass: uint8 tiles of a batch's rows in, their language-model embeddings out.

Tiles go to the device through page-locked memory (a quarter of float32's bytes) and are normalised there,
in chunks of `chunk` tiles; full chunks replay a CUDA graph (graphs.VisionGraph).

Ahead (engine.vision_ahead). The run loop hands the engine its next batch before the current one runs, and
`ahead(requests)` queues that batch's pass on a second CUDA stream: the GPU runs it while the current batch
prefills and decodes, whose decode steps leave most of the GPU idle for a small language model. When the
batch's `generate` comes, `features(requests)` finds the features there and makes the engine's stream wait
for them (a wait on the device, not on the host). The engine's own work then runs on a stream of higher
priority (`engine_stream`): its decode steps are a chain of small kernels, each waiting for the one before, and
the GPU schedules a waiting high-priority kernel's blocks before the vision pass's next ones. On the CPU there
is no second stream: the pass runs in place when asked ahead, which tests use to check that what is found ahead
is what the batch would have computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from batchvl.core import Request
from batchvl.engine.graphs import VisionGraph


@dataclass
class _Ahead:
    """A batch's features, computed before its `generate` call."""

    requests: list[Request]  # held, so that the ids in `index` stay theirs
    features: torch.Tensor | None  # [T * tokens_per_tile, C], the rows' features in order; None: no images
    index: dict[int, tuple[int, int, int]]  # id(request) -> (its place in `requests`, its features' start, end)
    done: torch.cuda.Event | None  # recorded on the side stream after the pass; None on the CPU


class VisionRunner:
    """The vision pass of the native engine (see the module docstring). `run(tiles)` is the model's own pass:
    uint8 tiles [t, S, S, 3] on the device -> embeddings [t, tokens_per_tile, C]."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], device: torch.device, tokens_per_tile: int,
                 chunk: int, cuda_graphs: bool, ahead: bool):
        self.run, self.device, self.tokens_per_tile, self.chunk = run, device, tokens_per_tile, chunk
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.ahead_on = ahead
        self._side = self._main = None
        if ahead and device.type == "cuda":
            _, high = torch.cuda.Stream.priority_range()  # (lowest, highest): the default stream has the lowest
            self._side, self._main = torch.cuda.Stream(device), torch.cuda.Stream(device, priority=high)
        self._ahead: list[_Ahead] = []  # at most two: the batch that runs next, and the one after it
        self._graph: VisionGraph | None = None
        self._pinned: torch.Tensor | None = None  # the host staging buffer for tiles

    @contextlib.contextmanager
    def engine_stream(self) -> Iterator[None]:
        """Run the engine's own work (prefill, decode) inside this: on the high-priority stream when the pass
        runs ahead on the side stream, else on the current stream as it is."""
        if self._main is None:
            yield
            return
        outer = torch.cuda.current_stream(self.device)
        self._main.wait_stream(outer)
        try:
            with torch.cuda.stream(self._main):
                yield
        finally:
            outer.wait_stream(self._main)

    @torch.inference_mode()
    def ahead(self, requests: list[Request]) -> None:
        """Start the pass of `requests`, the batch a later `generate` call runs (the next but one at most: older
        batches found ahead are dropped). With CUDA it is queued on the side stream and overlaps whatever the
        device runs meanwhile. Does nothing unless ahead is on."""
        if not self.ahead_on:
            return
        self._ahead = self._ahead[-1:]
        index, offset = {}, 0
        for i, r in enumerate(requests):
            n = 0 if r.tiles is None else r.tiles.shape[0] * self.tokens_per_tile
            index[id(r)] = (i, offset, offset + n)
            offset += n
        if self._side is None:
            self._ahead.append(_Ahead(list(requests), self.compute(requests), index, None))
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))  # the graph's buffers are free
        with torch.cuda.stream(self._side):
            features = self.compute(requests)
            done = torch.cuda.Event()
            done.record(self._side)
        self._ahead.append(_Ahead(list(requests), features, index, done))

    def features(self, requests: list[Request]) -> torch.Tensor | None:
        """The embeddings of `requests` (see `compute`): taken from a batch computed ahead when they are a run
        of its rows in order, else computed now."""
        if not requests:
            return None
        for ahead in self._ahead:
            places = [ahead.index.get(id(r)) for r in requests]
            if None in places or any(b[0] != a[0] + 1 for a, b in zip(places, places[1:], strict=False)):
                continue
            features = None if ahead.features is None else ahead.features[places[0][1] : places[-1][2]]
            if ahead.done is not None:  # the side stream's pass, before this stream reads its output
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(ahead.done)
                if features is not None:
                    features.record_stream(stream)  # made on the side stream, read on this one
            return features if features is not None and features.shape[0] else None
        if self._side is not None:  # the graph's buffers may be in use by a pass on the side stream
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        return self.compute(requests)

    def spent(self, requests: list[Request]) -> None:
        """The batch that begins with `requests[0]` has run (or failed): its features found ahead are dropped."""
        if requests:
            self._ahead = [a for a in self._ahead if id(requests[0]) not in a.index]

    def drop(self) -> None:
        """Drop every batch found ahead (after running out of memory: the retries compute theirs again)."""
        self._ahead = []

    def compute(self, requests: list[Request]) -> torch.Tensor | None:
        """The embeddings of all tiles of `requests`, in request order, computed now on the current stream:
        [T * tokens_per_tile, C], or None when they have no tiles."""
        tiles = [r.tiles for r in requests if r.tiles is not None]
        if not tiles:
            return None
        total = sum(t.shape[0] for t in tiles)
        if self.device.type == "cuda" and tiles[0].is_pinned():  # the preparer pins all rows' tiles or none
            # Prepared in page-locked memory (prepare.py): copy each row's tiles straight in, asynchronously.
            pixels = torch.empty((total, *tiles[0].shape[1:]), dtype=torch.uint8, device=self.device)
            offset = 0
            for t in tiles:
                pixels[offset : offset + t.shape[0]].copy_(t, non_blocking=True)
                offset += t.shape[0]
        else:
            host = self._staging(total, tiles[0].shape[1:])
            torch.cat(tiles, out=host)  # [T, S, S, 3] uint8
            pixels = host.to(self.device, non_blocking=True)
        out = []
        for start in range(0, total, self.chunk):
            chunk = pixels[start : start + self.chunk]  # [t, S, S, 3] uint8
            if self.cuda_graphs and chunk.shape[0] == self.chunk:
                if self._graph is None:
                    self._graph = VisionGraph(self.run, chunk)
                out.append(self._graph(chunk).flatten(0, 1).clone())
            else:
                out.append(self.run(chunk).flatten(0, 1))
        return torch.cat(out)

    def _staging(self, tiles: int, shape: torch.Size) -> torch.Tensor:
        """A host buffer for `tiles` uint8 tiles: pinned on CUDA (so the copy runs asynchronously), reused;
        the earlier copy from it must be done before it is reused."""
        if self.device.type != "cuda":
            return torch.empty((tiles, *shape), dtype=torch.uint8)
        torch.cuda.synchronize(self.device)  # both streams: a pass found ahead may still be copying from it
        buf = self._pinned
        if buf is None or buf.shape[0] < tiles or buf.shape[1:] != shape:
            buf = self._pinned = torch.empty((max(tiles, 1024), *shape), dtype=torch.uint8, pin_memory=True)
        return buf[:tiles]

    def close(self) -> None:
        """Drop the graph, the staging buffer and what was computed ahead."""
        self._graph = self._pinned = None
        self._ahead = []
