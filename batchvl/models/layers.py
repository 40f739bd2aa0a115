"""Small building blocks shared by the vision tower and the language models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight, as InternVL's models do."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


@torch.library.custom_op("batchvl::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias). On CUDA one cuBLASLt call whose epilogue adds the bias and applies GELU's
    tanh approximation (torch._addmm_activation; it has no exact-GELU epilogue), so the product's output is
    written once, already activated. Elsewhere the same function in two steps. A custom op, so that
    torch.compile keeps it whole rather than splitting it back into a product and a pointwise kernel."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        out = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)
    else:
        out = F.gelu(F.linear(x2, weight, bias), approximate="tanh")
    return out.reshape(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
