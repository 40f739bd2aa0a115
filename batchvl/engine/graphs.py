"""CUDA graphs for the decode step: the one place batchvl captures and replays them.

Decode graphs are captured up front, as nano-vllm does: one per batch-size bucket (1, 2, 4, 8, ... up to
the cache's slots), largest first, all into one memory pool, all at the cache's full span. A step pads its
batch up to the next bucket; nothing is captured in the decode loop and no graph is ever evicted. The
graphs read the KV cache and the rotary tables in place, so they are made again (by the runner) only when
the cache is reallocated, which happens when a batch needs a longer span than the cache has.

Graphs are captured after one eager warm-up step each, as CUDA requires.
"""

from __future__ import annotations

import logging

import torch

from batchvl.models.decoder import DecoderLM, KVCache

log = logging.getLogger(__name__)


def batch_buckets(max_rows: int) -> list[int]:
    """Batch sizes to capture decode graphs for: the powers of two below `max_rows`, then `max_rows`
    itself, so that every batch of 1..max_rows rows has a bucket at most twice its size."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1; got {max_rows}")
    sizes = []
    size = 1
    while size < max_rows:
        sizes.append(size)
        size *= 2
    return [*sizes, max_rows]


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `rows` rows (`buckets` sorted ascending)."""
    for size in buckets:
        if size >= rows:
            return size
    raise ValueError(f"a batch of {rows} rows is larger than the largest decode graph ({buckets[-1]})")


class DecodeGraphs:
    """Captured decode steps over one KV cache at its full span, one per batch-size bucket.

    `step` has the meaning of DecoderLM.decode + logits. The static inputs (each row's newest token and
    its position) are one buffer of the largest bucket's size that every graph reads a prefix of. The rows
    a batch pads with (from its size up to the bucket's) write K/V into cache rows no batch row uses, at
    position 0: in bounds, and attending one key only, so they cost almost nothing with the Triton kernel.
    Capture writes K/V too (position 0 of every row): the runner captures only into a cache with no rows.
    """

    def __init__(self, lm: DecoderLM, cache: KVCache, buckets: list[int]):
        self.lm, self.cache, self.buckets = lm, cache, sorted(buckets)
        self.span = cache.positions
        if self.buckets[-1] > cache.batch:
            raise ValueError(f"a decode graph of {self.buckets[-1]} rows over a cache of {cache.batch}")
        device = lm.embed.weight.device
        self.token = torch.zeros(self.buckets[-1], dtype=torch.long, device=device)  # [Bmax], static
        self.positions = torch.zeros(self.buckets[-1], dtype=torch.long, device=device)  # [Bmax], static
        self._live = 0  # rows the last step filled: the rows past a smaller batch are reset to position 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = pool = torch.cuda.graph_pool_handle()
        self._side = torch.cuda.Stream(device)  # where whole steps are captured (capture_step)
        self._states: dict[tuple, object] = {}  # batch states' tensors (state.SlotTensors), by key: see `state`
        self._steps: dict[tuple, tuple] = {}  # whole-step graphs, by the same keys: see `whole_step`
        for size in reversed(self.buckets):  # largest first: the smaller graphs reuse its pool memory
            log.debug("capturing a decode graph for batch %d, span %d", size, self.span)
            self._graphs[size] = self._capture(size, pool)

    def _capture(self, size: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        device = self.token.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up on a side stream (cuBLAS workspaces, autotuning, compiling)
            self._step(size)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the preparation threads may allocate page-locked memory meanwhile, which a global
        # capture would refuse.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            logits = self._step(size)  # [size, V] float32, static
        return graph, logits

    def _step(self, size: int) -> torch.Tensor:
        lm = self.lm
        x = lm.embed(self.token[:size])[:, None]  # [size, 1, C]
        return lm.logits(lm.decode(x, self.positions[:size], self.cache, self.span))

    def capture_step(self, step) -> torch.cuda.CUDAGraph:
        """`step()` (a whole decode step of a batch: the model over its own token and position tensors, then its
        sampling and bookkeeping, all in place) captured as one graph, in this pool. Its batch must be one of
        the buckets, whose compiled code and library handles the captures above warmed up. Captured with
        capture_begin/capture_end rather than torch.cuda.graph, which collects garbage and empties the cache
        first: once per batch, that would cost more than the graph saves."""
        graph = torch.cuda.CUDAGraph()
        self._side.wait_stream(torch.cuda.current_stream(self._side.device))
        with torch.cuda.stream(self._side):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                step()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self._side.device).wait_stream(self._side)
        return graph

    def state(self, key: tuple, make):
        """The per-slot tensors of every batch state of `key` (its size, width, ...) over this cache: made once by
        `make()`, then the same tensors for each such batch, which resets their values. A whole-step graph reads
        and writes them where they were at its capture."""
        if key not in self._states:
            self._states[key] = make()
        return self._states[key]

    def whole_step(self, key: tuple, owners: tuple, step) -> torch.cuda.CUDAGraph:
        """`step` (a whole decode step over the tensors `state(key, ...)` gave, for the same key) as a graph:
        captured (capture_step) the first time, then the same graph for every later batch of `key` whose step reads
        the same `owners` (the sampler and stop tensors it used, compared by identity: new generation settings
        capture it again)."""
        found = self._steps.get(key)
        if found is not None and all(a is b for a, b in zip(found[0], owners, strict=True)):
            return found[1]
        graph = self.capture_step(step)
        self._steps[key] = (owners, graph)
        return graph

    def step(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for each row's newest token [B] at positions [B] (each < span), attending over the
        cache's full span. The result is a static buffer that the next step overwrites."""
        rows = token.shape[0]
        size = bucket_for(rows, self.buckets)
        if rows < self._live:  # rows a larger batch filled: back to position 0, out of the way
            self.token[rows : self._live].zero_()
            self.positions[rows : self._live].zero_()
        self._live = rows
        self.token[:rows].copy_(token)
        self.positions[:rows].copy_(positions)
        graph, logits = self._graphs[size]
        graph.replay()
        return logits[:rows]


class VisionGraph:
    """The vision pass over one full chunk of tiles as a CUDA graph: uint8 tiles in, LM embeddings out.

    Normalising and the tower's few hundred kernels replay as one launch, so the pass no longer waits on
    a host thread that shares the GIL with the media-preparation threads. Only full chunks (the engine's
    `vision_chunk` tiles) use it; a batch's last partial chunk runs as it is. `__call__` returns a static
    buffer that the next replay overwrites: copy what you keep.
    """

    def __init__(self, run, tiles: torch.Tensor):
        self.tiles = torch.zeros_like(tiles)  # [T, S, S, 3] uint8, static
        device = tiles.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up: cuDNN/cuBLAS choices, torch.compile's first call
            run(self.tiles)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # see _Graph
            self.features = run(self.tiles)  # [T, tokens_per_tile, C], static

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        self.tiles.copy_(tiles)
        self.graph.replay()
        return self.features
