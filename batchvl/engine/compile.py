"""torch.compile for the native engine, in one place: regional compilation of the repeated blocks.

The vision tower's embedding, each vision block and each decoder layer's two pointwise-heavy halves (norm +
qkv + rotary; o + residual + norm + MLP + residual) are compiled, not the whole model: every layer runs the
same code on tensors of the same shapes, so one compiled version serves them all, and compile time stays that
of one block. What inductor gains is fusion of the elementwise work between the matrix products (norms,
rotary, GELU/SiLU, layer scale, residual adds), about a third of the GPU time of an eager prefill. The KV-
cache writes and decode attention stay outside the compiled regions (they index per layer and per row).

Shapes are marked dynamic from the start (rows and prompt lengths change from batch to batch), so a region
compiles once for prefill and once for decode (whose sequence dim of 1 is specialised). Decode graphs are
captured after a warm-up step, so compilation never happens inside a capture.
"""

from __future__ import annotations

import torch

from batchvl.models.loader import InternVL

# torch.compile specialises a dimension of size 1 even where it is marked dynamic, so a pass of one row (or one tile)
# compiles the regions again: on the H200 the 1B's tower took 4.6 s to, in the one batch of `mixed` whose tiles left
# a chunk of one (BENCHMARKS.md, session 9). The engine pads such passes to this many: VisionRunner's min_tiles,
# ModelRunner's min_rows.
COMPILED_MIN_ROWS = 2


def compile_model(model: InternVL) -> None:
    """Compile `model`'s repeated blocks in place (see the module docstring). Safe to call once per model."""
    vit = model.vision.vit
    vit.embed = torch.compile(vit.embed, dynamic=True)  # the patches' copy, the CLS concatenation, the positions
    for block in vit.blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
    for layer in model.lm.layers:
        layer._qkv = torch.compile(layer._qkv, dynamic=True)
        layer._finish = torch.compile(layer._finish, dynamic=True)
