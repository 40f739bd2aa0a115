"""Random weights in place of a checkpoint's (`engine.load_format: dummy`), for benchmarks of models whose
weights are not on disk (a 76B checkpoint does not fit a 64 GB disk). vLLM's `--load-format dummy` is the same
idea.

Each parameter of the model, already materialised (empty) on its device, is filled in turn from one seeded
generator on that device: normal * 0.02, and norm weights 1 + normal * 0.02 (so that activations keep their
scale through the layers). Nothing else is allocated beyond a block of rows: an Fp8Linear's weight is drawn a
block of rows at a time in the model's dtype and quantized into its fp8 weight and per-row scales
(`quantize_weight`), so the dense model is never held, and peak memory stays near the final size.

Text from random weights means nothing; only its speed does.
"""

from __future__ import annotations

import torch
from torch import nn

from batchvl.models.fp8 import QUANTIZE_ROWS_AT_ONCE, Fp8Linear, quantize_weight

STD = 0.02


def fill_dummy(model: nn.Module, dtype: torch.dtype, seed: int = 0, rows_at_once: int = QUANTIZE_ROWS_AT_ONCE) -> int:
    """Fill every parameter of `model` in place with seeded random values (see the module docstring); returns the
    number of parameters filled. `dtype`: the model's dtype, in which an fp8 layer's dense rows are drawn before
    they are quantized. The same seed, device and dtype give the same weights."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    filled = 0
    fp8_params = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Fp8Linear):
                _fill_fp8(module, dtype, g, rows_at_once)
                fp8_params.update({f"{name}.weight", f"{name}.weight_scale"})
                filled += 2
        for name, param in model.named_parameters():
            if name in fp8_params:
                continue
            param.normal_(1.0 if _is_norm_weight(name, param) else 0.0, STD, generator=g)  # in place, no temporary
            filled += 1
    return filled


def _is_norm_weight(name: str, param: torch.Tensor) -> bool:
    return param.dim() == 1 and name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]


def _fill_fp8(layer: Fp8Linear, dtype: torch.dtype, g: torch.Generator, rows_at_once: int) -> None:
    """An Fp8Linear's weight and scales from random dense rows, a block at a time (the loader's arithmetic)."""
    out, inp = layer.weight.shape
    for start in range(0, out, rows_at_once):
        rows = min(rows_at_once, out - start)
        dense = (torch.randn(rows, inp, generator=g, device=layer.weight.device, dtype=torch.float32) * STD).to(dtype)
        q, scale = quantize_weight(dense, rows_at_once)
        layer.weight[start : start + rows].copy_(q)
        layer.weight_scale[start : start + rows].copy_(scale)
    if layer.bias is not None:
        layer.bias.normal_(0.0, STD, generator=g)
