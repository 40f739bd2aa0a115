"""How the native engine shares the device memory left after the weights: the KV cache, and the activations
of one prefill chunk and one vision chunk.

The KV cache used to take 60% of the free memory, and the other 40% was left to the activations. That held
for the 1B to 8B shapes, whose activations are small next to that 40%. It did not for the 76B shape in fp8
(H200, BENCHMARKS.md): 84 GB of weights left about 64 GB, and one 65,536-token prefill chunk of a
Llama-3-70B decoder (hidden 8,192, MLP 28,672) holds about 18 GB of activations, which with the vision
tower's chunk and the allocator's slack did not fit in the 26 GB left beside the cache. A batch of 64 ran out
of memory.

So the activations are counted first (`activation_bytes_per_token` times the chunk sizes), the prefill chunk
is cut where they would take more than `ACTIVATION_SHARE` of the free memory, and the cache gets a share of
what is left, never more than the old 60%. For the 1B to 8B shapes nothing changes: their cache keeps its
60%, and their chunks their size.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchvl.models.decoder import DecoderSpec
from batchvl.models.internvit import VisionSpec

CACHE_SHARE = 0.6  # the most of the free memory the KV cache takes
ACTIVATION_SHARE = 0.35  # the most of it one prefill chunk and one vision chunk may take together
SLACK = 0.8  # of what the activations leave, the share the cache takes: the rest is the allocator's slack,
# cuBLAS and Triton workspaces, the decode graphs' pool and the batch's image features
FIXED_RESERVE = 1 << 30  # bytes kept aside whatever the shapes
MIN_PREFILL_TOKENS = 8192  # a smaller chunk would leave the matrix products short of the GPU's peak
PREFILL_ROUND = 1024


@dataclass(frozen=True)
class MemoryPlan:
    cache_bytes: int  # for the KV cache
    prefill_tokens: int  # tokens of one prefill chunk (at most the asked-for size)
    activation_bytes: int  # what one prefill chunk and one vision chunk are counted to hold


def activation_bytes_per_token(hidden: int, intermediate: int, q_width: int, kv_width: int, dtype_bytes: int) -> int:
    """What one token of a layer's forward keeps live at its peak, in bytes, by our count. The MLP's peak holds
    its fused gate/up output (2 * intermediate), the activated product (intermediate), and beside them the
    residual stream, the normed input and the attention's output (hidden each, with room for one more); qkv's
    output (q_width + 2 * kv_width) is gone by then but is counted, to stay on the safe side."""
    return dtype_bytes * (3 * intermediate + 4 * hidden + q_width + 2 * kv_width)


def plan_memory(free_bytes: int, text: DecoderSpec, vision: VisionSpec | None, dtype_bytes: int,
                prefill_tokens: int, vision_chunk: int) -> MemoryPlan:
    """Split `free_bytes` (what the device has free once the weights are loaded) between the KV cache and the
    activations of one prefill chunk of at most `prefill_tokens` tokens and one vision chunk of `vision_chunk`
    tiles. See the module docstring."""
    text_per_token = activation_bytes_per_token(text.hidden, text.intermediate, text.q_width, text.kv_width,
                                                dtype_bytes)
    vision_bytes = 0
    if vision is not None:
        tile_tokens = vision.grid * vision.grid + 1  # the patches and the class token
        vision_bytes = vision_chunk * tile_tokens * activation_bytes_per_token(
            vision.hidden, vision.intermediate, vision.hidden, vision.hidden, dtype_bytes)
    room = int(free_bytes * ACTIVATION_SHARE) - vision_bytes - FIXED_RESERVE
    fits = max(room // text_per_token // PREFILL_ROUND * PREFILL_ROUND, MIN_PREFILL_TOKENS)
    tokens = min(prefill_tokens, fits)
    activations = tokens * text_per_token + vision_bytes + FIXED_RESERVE
    cache = min(int(free_bytes * CACHE_SHARE), int((free_bytes - activations) * SLACK))
    return MemoryPlan(max(cache, 0), tokens, activations)
