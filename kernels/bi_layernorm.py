"""A batch-invariant LayerNorm (InternViT-300M's blocks, the projector): one program per row, fixed order.

torch.nn.LayerNorm, per row of x [M, K], in float32 and rounded once to x's dtype:

    mean = sum(x) / K,  var = sum((x - mean)^2) / K,  y = (x - mean) / sqrt(var + eps) * weight + bias

A program reads its row in BLOCK_K chunks three times (mean, variance, output), from the first chunk to the
last, each sum element-wise into a [BLOCK_K] float32 vector reduced once; BLOCK_K and the warps come from K
only, so a row's bits do not depend on M or on its place in x. torch computes the variance by Welford's method
and this kernel in two passes: they agree to the dtype's rounding, not bit for bit.
"""

from __future__ import annotations

import torch

# tl is None when triton is missing: see jit_when_triton
from batchvl.kernels.bi_rmsnorm import check_norm_device, check_norm_params, norm_block
from batchvl.kernels.fp8_quant import as_rows, jit_when_triton, tl


@jit_when_triton
def _bi_layernorm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, stride_x, stride_y, eps, K: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    total = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a compile-time constant: a fixed order of chunks
        total += tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
    mean = tl.div_rn(tl.sum(total, 0), K * 1.0)
    squares = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + cols < K
        d = tl.where(mask, tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
        squares += d * d
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(squares, 0), K * 1.0) + eps))
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + cols < K
        x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * tl.load(w_ptr + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + k0 + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def bi_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm of each row of x, each row's bits independent of the others and of their number.

    x [..., K] bfloat16/float16/float32, last dim contiguous, leading dims any stride that flattens to rows, on a
    CUDA GPU or on the CPU under TRITON_INTERPRET=1; weight and bias (or None) [K] contiguous, x's dtype and
    device. Returns [..., K] in x's dtype (see the module docstring for the formula).
    """
    rows = as_rows(x, "bi_layernorm")  # [M, K]
    check_norm_params(rows, "bi_layernorm", weight=weight, bias=bias)
    check_norm_device(x, "bi_layernorm")
    m, k = rows.shape
    y = torch.empty((m, k), device=x.device, dtype=x.dtype)  # [M, K]
    if m:
        block_k = norm_block(k)
        _bi_layernorm_kernel[(m,)](rows, weight, weight if bias is None else bias, y, rows.stride(0), y.stride(0),
                                   float(eps), K=k, HAS_BIAS=bias is not None, BLOCK_K=block_k,
                                   num_warps=min(16, max(4, block_k // 512)))
    return y.view(x.shape)
