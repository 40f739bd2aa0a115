"""The native engine's vision pass: uint8 tiles of a batch's rows in, their language-model embeddings out.

Tiles go to the device through page-locked memory (a quarter of float32's bytes) and are normalised there,
in chunks of `chunk` tiles; full chunks replay a CUDA graph (graphs.VisionGraph). A last chunk smaller than
`min_tiles` is padded with blank tiles to that many:
- `min_tiles` = `chunk` (the deterministic mode): every pass has the same shape, so a tile's features do not depend
  on how many tiles shared its pass;
- `min_tiles` = 2 (a compiled tower): torch.compile specialises a dimension of size 1 even when it is marked
  dynamic, and on the H200 the 1B's tower took 4.6 s to compile again in the one batch of `mixed` whose tiles left
  a chunk of one (BENCHMARKS.md, session 9).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from batchvl.core import Request
from batchvl.engine.graphs import VisionGraph


class VisionRunner:
    """The vision pass of the native engine (see the module docstring). `run(tiles)` is the model's own pass:
    uint8 tiles [t, S, S, 3] on the device -> embeddings [t, tokens_per_tile, C]."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], device: torch.device, chunk: int,
                 cuda_graphs: bool, min_tiles: int = 1):
        self.run, self.device, self.chunk = run, device, chunk
        self.min_tiles = min(min_tiles, chunk)  # a smaller last chunk is padded with blank tiles to this many
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self._graph: VisionGraph | None = None
        self._pinned: torch.Tensor | None = None  # the host staging buffer for tiles

    def compute(self, requests: list[Request]) -> torch.Tensor | None:
        """The embeddings of all tiles of `requests`, in request order: [T * tokens_per_tile, C], or None when
        they have no tiles. Requests that share one tiles tensor (the samples of a row, generation.n) have it
        through the tower once."""
        tiles = [r.tiles for r in requests if r.tiles is not None]
        if not tiles:
            return None
        unique = list({id(t): t for t in tiles}.values())
        features = self._pass(unique)  # [U * tokens_per_tile, C]
        if len(unique) == len(tiles):
            return features
        per_tile = features.shape[0] // sum(t.shape[0] for t in unique)
        spans, start = {}, 0
        for t in unique:
            spans[id(t)] = features[start : start + t.shape[0] * per_tile]
            start += t.shape[0] * per_tile
        return torch.cat([spans[id(t)] for t in tiles])

    def _pass(self, tiles: list[torch.Tensor]) -> torch.Tensor:
        """The embeddings of `tiles` (uint8 [t, S, S, 3] each), in order: [T * tokens_per_tile, C]."""
        total = sum(t.shape[0] for t in tiles)
        if self.device.type == "cuda" and tiles[0].is_pinned():  # the preparer pins all rows' tiles or none
            # Prepared in page-locked memory (prepare.py): each row's tiles straight in, asynchronously, in one
            # call. A copy_ per row is a call per row, and each lets the GIL go and waits to take it back: beside
            # busy preparation threads, 128 rows' calls left the GPU idle between copies (BENCHMARKS.md, session 8).
            pixels = torch.empty((total, *tiles[0].shape[1:]), dtype=torch.uint8, device=self.device)
            torch._foreach_copy_(list(pixels.split([t.shape[0] for t in tiles])), tiles, non_blocking=True)
        else:
            host = self._staging(total, tiles[0].shape[1:])
            torch.cat(tiles, out=host)  # [T, S, S, 3] uint8
            pixels = host.to(self.device, non_blocking=True)
        out = []
        for start in range(0, total, self.chunk):
            chunk = pixels[start : start + self.chunk]  # [t, S, S, 3] uint8
            real = chunk.shape[0]
            if real < self.min_tiles:
                chunk = torch.cat([chunk, chunk.new_zeros((self.min_tiles - real, *chunk.shape[1:]))])
            if self.cuda_graphs and chunk.shape[0] == self.chunk:
                if self._graph is None:
                    self._graph = VisionGraph(self.run, chunk)
                out.append(self._graph(chunk)[:real].flatten(0, 1).clone())
            else:
                out.append(self.run(chunk)[:real].flatten(0, 1))
        return torch.cat(out)

    def _staging(self, tiles: int, shape: torch.Size) -> torch.Tensor:
        """A host buffer for `tiles` uint8 tiles: pinned on CUDA (so the copy runs asynchronously), reused;
        the earlier copy from it must be done before it is reused."""
        if self.device.type != "cuda":
            return torch.empty((tiles, *shape), dtype=torch.uint8)
        torch.cuda.current_stream(self.device).synchronize()
        buf = self._pinned
        if buf is None or buf.shape[0] < tiles or buf.shape[1:] != shape:
            buf = self._pinned = torch.empty((max(tiles, 1024), *shape), dtype=torch.uint8, pin_memory=True)
        return buf[:tiles]

    def close(self) -> None:
        """Drop the graph and the staging buffer."""
        self._graph = self._pinned = None
