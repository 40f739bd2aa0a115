"""Batch-invariant layers for `engine.deterministic`, swapped in after load as fp8 swaps its layers.

Each row's output must not depend on the batch it ran in. `make_batch_invariant` replaces every nn.Linear, RMSNorm
and nn.LayerNorm of the language model and the vision side (the LM head and the projector included) with a
module that runs the batch-invariant Triton kernel of batchvl.kernels (bi_matmul, bi_rmsnorm, bi_layernorm),
and routes the vision tower's patch embedding through bi_matmul. The modules keep the loaded parameters (a tied
LM head keeps sharing the embedding's). Attention is the engine's part: see `prefill_attention_per_row`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchvl.models.layers import RMSNorm


class InvariantLinear(nn.Module):
    """nn.Linear's y = x W^T + b through bi_matmul: float32 accumulation in a fixed order over K."""

    def __init__(self, linear: nn.Linear, matmul):
        super().__init__()
        self.weight, self.bias, self.matmul = linear.weight, linear.bias, matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x.contiguous(), self.weight, self.bias)


class InvariantRMSNorm(nn.Module):
    """batchvl's RMSNorm through bi_rmsnorm."""

    def __init__(self, norm: RMSNorm, kernel):
        super().__init__()
        self.weight, self.eps, self.kernel = norm.weight, norm.eps, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x.contiguous(), self.weight, self.eps)


class InvariantLayerNorm(nn.Module):
    """nn.LayerNorm over the last dim through bi_layernorm."""

    def __init__(self, norm: nn.LayerNorm, kernel):
        super().__init__()
        self.weight, self.bias, self.eps, self.kernel = norm.weight, norm.bias, norm.eps, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x.contiguous(), self.weight, self.bias, self.eps)


def make_batch_invariant(model: nn.Module) -> None:
    """Swap `model`'s linear layers and norms for the batch-invariant ones, in place; the vision tower's patch
    embedding (a matrix product over the patches) goes through bi_matmul too. Raises ImportError when triton is
    missing."""
    from batchvl.kernels import bi_layernorm, bi_matmul, bi_rmsnorm

    swaps = {nn.Linear: lambda m: InvariantLinear(m, bi_matmul), RMSNorm: lambda m: InvariantRMSNorm(m, bi_rmsnorm),
             nn.LayerNorm: lambda m: InvariantLayerNorm(m, bi_layernorm)}
    for name, module in list(model.named_modules()):
        make = swaps.get(type(module))
        if make is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, make(module))
    for vit in [m for m in model.modules() if hasattr(m, "patch_linear")]:
        vit.patch_linear = lambda x, w, b: bi_matmul(x.contiguous(), w.contiguous(), b)


def prefill_attention_per_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                              gqa: bool) -> torch.Tensor:
    """Causal attention of right-padded prompts, each row over its own length only: q [B, H, P, D], k, v
    [B, Hkv, P, D], lengths (B ints, on the host) -> [B, H, P, D] (zeros past each length).

    SDPA over the padded batch picks its blocks (and on the GPU its split of the keys) from P and B, so a row's
    sums would change with the longest prompt beside it. One call per row, on contiguous copies of exactly its
    own positions, gives the kernel the same input whatever the batch: B launches per layer; the lengths are read
    to the host once per prefill (DecoderLM.prefill)."""
    out = torch.zeros_like(q)
    for b, n in enumerate(lengths):
        rows = [t[b : b + 1, :, :n].contiguous() for t in (q, k, v)]  # [1, H or Hkv, n, D]
        out[b, :, :n] = F.scaled_dot_product_attention(*rows, is_causal=True, enable_gqa=gqa)[0]
    return out
