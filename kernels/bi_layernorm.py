"""A batch-invariant LayerNorm (InternViT-300M's blocks, the projector): one program per row, fixed order.

torch.nn.LayerNorm, per row of x [M, K], in float32 and rounded once to x's dtype:

    mean = sum(x) / K,  var = sum((x - mean)^2) / K,  y = (x - mean) / sqrt(var + eps) * weight + bias

A program takes ROWS rows and reads them in BLOCK_K chunks three times (mean, variance, output), from the first
chunk to the last, each sum element-wise into a [ROWS, BLOCK_K] float32 block reduced along the row once; ROWS,
BLOCK_K and the warps come from K only (as bi_rmsnorm's), so a row's bits do not depend on M or on its place.
torch computes the variance by Welford's method and this kernel in two passes: they agree to the
dtype's rounding, not bit for bit.
"""

from __future__ import annotations

import torch

# tl is None when triton is missing: see jit_when_triton
from batchvl.kernels.bi_rmsnorm import norm_tiles
from batchvl.kernels.fp8_quant import as_rows, check_triton_device, jit_when_triton, tl, triton
from batchvl.kernels.rmsnorm_fp8_quant import check_norm_params


@jit_when_triton
def _bi_layernorm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, stride_x, stride_y, eps, K: tl.constexpr,
                         HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]: each reduced on its own
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_x
    y_rows = y_ptr + rows[:, None] * stride_y
    total = tl.zeros([ROWS, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a compile-time constant: a fixed order of chunks
        mask = row_ok[:, None] & (k0 + cols < K)[None, :]
        total += tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.div_rn(tl.sum(total, 1), K * 1.0)[:, None]  # [ROWS, 1]
    squares = tl.zeros([ROWS, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (k0 + cols < K)[None, :]
        d = tl.where(mask, tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
        squares += d * d
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(squares, 1), K * 1.0) + eps))[:, None]
    for k0 in range(0, K, BLOCK_K):
        col_ok = k0 + cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * tl.load(w_ptr + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_rows + k0 + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def bi_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm of each row of x, each row's bits independent of the others and of their number.

    x [..., K] bfloat16/float16/float32, last dim contiguous, leading dims any stride that flattens to rows, on a
    CUDA GPU or on the CPU under TRITON_INTERPRET=1; weight and bias (or None) [K] contiguous, x's dtype and
    device. Returns [..., K] in x's dtype (see the module docstring for the formula).
    """
    rows = as_rows(x, "bi_layernorm")  # [M, K]
    check_norm_params(rows, "bi_layernorm", weight=weight, bias=bias)
    check_triton_device(x, "bi_layernorm")
    m, k = rows.shape
    y = torch.empty((m, k), device=x.device, dtype=x.dtype)  # [M, K]
    if m:
        per, block_k = norm_tiles(k)
        _bi_layernorm_kernel[(triton.cdiv(m, per),)](rows, weight, weight if bias is None else bias, y, m,
                                                     rows.stride(0), y.stride(0), float(eps), K=k,
                                                     HAS_BIAS=bias is not None, ROWS=per, BLOCK_K=block_k,
                                                     num_warps=8)
    return y.view(x.shape)
