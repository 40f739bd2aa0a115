"""CUDA graphs for the decode step: the one place batchvl captures and replays them.

One graph per (batch size, attended span) bucket. Each holds static input buffers (the newest token of
every row and its position) and a static output (the logits); a decode step copies its inputs in,
replays, and reads the logits. The KV cache and the rotary tables must not move while graphs exist: the
engine drops every graph when it reallocates its cache, and computes the rotary tables for the model's
whole context before the first capture. Graphs share one memory pool, and are captured
after one eager warm-up step, as CUDA requires.
"""

from __future__ import annotations

import logging

import torch

from batchvl.models.decoder import DecoderLM, KVCache

log = logging.getLogger(__name__)


class _Graph:
    def __init__(self, lm: DecoderLM, cache: KVCache, batch: int, span: int, pool):
        device = lm.embed.weight.device
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        # The warm-up step really runs and writes K/V at these positions: use the span's last one, which no
        # row has reached yet (it is masked until written), never a prompt position.
        self.positions = torch.full((batch,), span - 1, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up on a side stream (cuBLAS workspaces, autotuning)
            self._step(lm, cache, span)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the preparation threads may allocate page-locked memory meanwhile, which a global
        # capture would refuse.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.logits = self._step(lm, cache, span)  # [B, V] float32, static

    def _step(self, lm: DecoderLM, cache: KVCache, span: int) -> torch.Tensor:
        return lm.logits(lm.decode(lm.embed(self.token)[:, None], self.positions, cache, span))


class DecodeGraphs:
    """Captured decode steps, by (batch, span). `step` has the same meaning as DecoderLM.decode + logits."""

    def __init__(self, lm: DecoderLM, max_graphs: int = 16):
        self.lm = lm
        self.max_graphs = max_graphs
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None
        self._cache: KVCache | None = None

    def step(self, token: torch.Tensor, positions: torch.Tensor, cache: KVCache, span: int) -> torch.Tensor:
        """Logits [B, V] for each row's newest token [B] at positions [B], attending over [0, span)."""
        if cache is not self._cache:  # a new cache: every graph points at the old one
            self.reset()
            self._cache = cache
        key = (token.shape[0], span)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                self.reset()
                self._cache = cache
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            log.debug("capturing a decode graph for batch %d, span %d", *key)
            graph = self._graphs[key] = _Graph(self.lm, cache, key[0], span, self._pool)
        graph.token.copy_(token)
        graph.positions.copy_(positions)
        graph.graph.replay()
        return graph.logits

    def reset(self) -> None:
        self._graphs.clear()
        self._cache = None


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
