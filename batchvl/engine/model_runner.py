"""The model runner: token ids in, logits out, over the KV cache it owns (nano-vllm's ModelRunner).

It knows nothing of rows' progress (that is BatchState's); it owns what outlives a batch: the KV cache,
its span policy and the decode graphs captured over it.

Span policy. A batch needs `need` positions per row (its longest prompt + max_new_tokens), rounded up to
SPAN_BUCKET. The cache has `max_batch_size` slots and a span that only grows: when a batch needs more
positions than the cache has, the cache is reallocated at the new span and every decode graph is captured
again, once, at that span (the only time graphs are dropped). Decode graphs attend over the cache's full
span; eager decode (the CPU, or cuda_graphs off) attends over the batch's own rounded need, as before.
When `max_batch_size` slots at the grown span would not fit the token budget (`max_batch_tokens`, the
cache's share of device memory), the cache gets the slots the budget allows (at least the batch's rows),
and if those are fewer than a batch's rows, it starts over from that batch's own span.
"""

from __future__ import annotations

import logging
import math

import torch

from batchvl.engine.graphs import DecodeGraphs, batch_buckets
from batchvl.models.decoder import DecoderLM, KVCache

log = logging.getLogger(__name__)

SPAN_BUCKET = 256  # spans are rounded up to this, so that the cache (and its graphs) serve many batches


def batch_span(need: int, max_positions: int) -> int:
    """Positions a batch whose rows need `need` attends over: rounded up to SPAN_BUCKET, never past the
    model's context (the rotary tables) unless the rows themselves need more."""
    return min(SPAN_BUCKET * math.ceil(need / SPAN_BUCKET), max(need, max_positions))


def prefill_chunks(lengths: list[int], budget: int, max_rows: int = 0) -> list[tuple[int, int, int]]:
    """Consecutive row chunks of rows whose lengths are `lengths`, in order: (start, end, width) for rows [start,
    end), each as many rows as fit `budget` tokens when padded to the chunk's own longest row, `width` (at least one
    row a chunk; at most `max_rows` where given). Prefill's chunks, of prompt lengths: activations stay bounded by
    the budget, and a chunk of short prompts is not padded to the batch's longest (the engine orders a batch's rows
    by length: native.by_length). The engine's static sub-batches too, of prompt + max_new_tokens."""
    chunks: list[tuple[int, int, int]] = []
    start, width = 0, 0
    for i, length in enumerate(lengths):
        wider = max(width, length)
        if i > start and (wider * (i + 1 - start) > budget or i - start == max_rows):
            chunks.append((start, i, width))
            start, wider = i, length
        width = wider
    if lengths:
        chunks.append((start, len(lengths), width))
    return chunks


class ModelRunner:
    """Prefill and decode over one KV cache; decode through CUDA graphs when `cuda_graphs` is set."""

    def __init__(self, lm: DecoderLM, device: torch.device, dtype: torch.dtype, max_batch_size: int,
                 max_batch_tokens: int, image_token_id: int, cuda_graphs: bool, min_rows: int = 1):
        self.lm, self.device, self.dtype = lm, device, dtype
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.image_token_id = image_token_id
        self.cuda_graphs = cuda_graphs
        # A prefill chunk of fewer rows runs its rows repeated up to this many, the copies writing the same keys and
        # values to their rows: compile.COMPILED_MIN_ROWS for a compiled model (refill's last admission is often
        # one row).
        self.min_rows = min_rows
        self.cache: KVCache | None = None
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs:
            lm.rope(lm.spec.max_positions)  # fixed tables: graphs read them in place

    def reserve(self, rows: int, need: int) -> tuple[KVCache, int]:
        """A cache with at least `rows` slots of `need` positions, and the span decode attends over in it
        (see the module docstring). Reallocating it (and capturing the decode graphs) happens here, before a
        batch's prefill, never in the decode loop."""
        span = batch_span(need, self.lm.spec.max_positions)
        c = self.cache
        if c is None or c.batch < rows or c.positions < span:
            self._allocate(rows, span)
        return self.cache, self.cache.positions if self.graphs is not None else span

    def _allocate(self, rows: int, span: int) -> None:
        old = self.cache
        grown = max(span, old.positions) if old is not None else span  # the span only grows...
        slots = min(self.max_batch_size, self.max_batch_tokens // grown)
        if slots < rows:  # ...unless the budget then holds fewer slots than this batch has rows
            grown, slots = span, min(self.max_batch_size, self.max_batch_tokens // span)
        slots = max(slots, rows)
        self.graphs = self.cache = None  # free the old cache and graphs' pool before allocating the new
        log.debug("KV cache: %d slots x %d positions", slots, grown)
        self.cache = KVCache(self.lm.spec, slots, grown, self.device, self.dtype)
        if self.cuda_graphs:
            try:
                self.graphs = DecodeGraphs(self.lm, self.cache, batch_buckets(slots))
            except BaseException:  # out of memory, say: without its graphs, the cache would run eager from now on
                self.cache = None
                raise

    def release(self, max_batch_size: int) -> None:
        """Free the cache and the decode graphs; the next batch allocates them again, for at most
        `max_batch_size` rows."""
        self.max_batch_size = max_batch_size
        self.graphs = self.cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, features: torch.Tensor | None, cache: KVCache,
                rows: int | torch.Tensor, chunk_tokens: int, image_tokens: int,
                host_lengths: list[int]) -> torch.Tensor:
        """ids [n, P] right-padded prompts (lengths [n], and `host_lengths` the same on the host) into cache rows
        rows .. rows + n (or the rows an [n] index tensor names), with the image embeddings `features`
        [T * tokens_per_tile, C] at the image context tokens, in row order; `image_tokens` is how many of those the
        prompts hold. Both are counted on the host: reading them from the device would wait for it. Returns the
        logits of each row's last token [n, V] float32. In row chunks of at most `chunk_tokens` tokens, each cut to
        its own longest prompt (prefill_chunks): activations stay bounded while the cache holds the whole batch."""
        lm = self.lm
        x = lm.embed(ids)  # [n, P, C]
        if features is not None:
            if image_tokens != features.shape[0]:
                raise RuntimeError(f"{image_tokens} image context tokens for {features.shape[0]} features")
            # masked_scatter_, not x[mask] = ...: a boolean index waits for the device to count the mask.
            x.masked_scatter_((ids == self.image_token_id)[..., None], features.to(x.dtype))
        out = []
        for a, b, w in prefill_chunks(host_lengths, chunk_tokens):
            xs, ls, hs = x[a:b, :w], lengths[a:b], host_lengths[a:b]
            at = rows + a if isinstance(rows, int) else rows[a:b]
            copies = -(-self.min_rows // (b - a))  # see min_rows
            if copies > 1:  # each copy writes the same keys and values to the same cache rows, an index tensor's
                at = torch.arange(at, at + b - a, device=self.device) if isinstance(at, int) else at
                xs, ls, at, hs = xs.repeat(copies, 1, 1), ls.repeat(copies), at.repeat(copies), hs * copies
            out.append(lm.logits(lm.prefill(xs, ls, cache, at, hs))[: b - a])
        return torch.cat(out)  # [n, V]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, span: int,
               eager: bool = False) -> torch.Tensor:
        """Logits [B, V] for each row's newest token [B] written at positions [B] (< span), attending over
        cache positions [0, span): a replayed CUDA graph (whose output the next step overwrites) when
        graphs are on, eager otherwise. With the Triton decode kernel each row reads only its own
        positions + 1 keys, so a graph's full span costs nothing extra; with SDPA it is span-proportional
        work for every row (masked, but read). `eager`: the model's own call even where graphs are on (inside
        BatchState's capture of a whole step)."""
        if self.graphs is not None and not eager:
            if cache is not self.graphs.cache or span != self.graphs.span:
                raise RuntimeError("decode graphs were captured over another cache or span")
            return self.graphs.step(tokens, positions)
        lm = self.lm
        return lm.logits(lm.decode(lm.embed(tokens)[:, None], positions, cache, span))

    def close(self) -> None:
        """Drop the cache and the graphs (their memory goes back to PyTorch's allocator)."""
        self.graphs = self.cache = None
