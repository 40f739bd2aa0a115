"""A batch-invariant RMSNorm: one program per row, its sum of squares in a fixed order set by the width alone.

batchvl.models.layers.RMSNorm, per row of x [M, K]:

    h = x.float() * rsqrt(mean(x.float()^2) + eps)     in float32
    y = weight * h.to(x.dtype)                          rounded to x's dtype twice, as the module does

A program takes ROWS rows and reads them in BLOCK_K chunks, from the first to the last, adding each row's squares
element-wise into a [ROWS, BLOCK_K] float32 block that is reduced along the row once at the end; ROWS, BLOCK_K
and the warps come from K only. No row is split between programs and rows never mix (a row past M is masked),
so a row's bits do not depend on M or on its place in x.
(torch's own norm is row-independent on the GPU too as long as its kernel choice ignores M; inductor's fused
norms split a reduction across programs when there are few rows, which is why the deterministic mode turns
torch.compile off.) The reciprocal square root is 1 / sqrt, each correctly rounded, where torch.rsqrt on the GPU
is not: against the module the kernel agrees to the dtype's rounding, not bit for bit.
"""

from __future__ import annotations

import torch

# triton and tl are None when triton is missing: see jit_when_triton
from batchvl.kernels.fp8_quant import as_rows, check_triton_device, jit_when_triton, tl, triton
from batchvl.kernels.rmsnorm_fp8_quant import _round_to, check_norm_params


@jit_when_triton
def _bi_rmsnorm_kernel(x_ptr, w_ptr, y_ptr, M, stride_x, stride_y, eps, K: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]: each reduced on its own
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_x
    y_rows = y_ptr + rows[:, None] * stride_y
    squares = tl.zeros([ROWS, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a compile-time constant: a fixed order of chunks
        mask = row_ok[:, None] & (k0 + cols < K)[None, :]
        x = tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        squares += x * x
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(squares, 1), K * 1.0) + eps))[:, None]  # [ROWS, 1]
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (k0 + cols < K)[None, :]
        x = tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = _round_to(x * rstd, x_ptr.dtype.element_ty)  # the norm's output in the model's dtype
        w = tl.load(w_ptr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)[None, :]
        y = _round_to(w * h, x_ptr.dtype.element_ty)  # exact product of two bf16/fp16 values, rounded once
        tl.store(y_rows + k0 + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def norm_tiles(k: int) -> tuple[int, int]:
    """(rows, chunk) of a norm program, from K alone: the chunk it reads at a time is K rounded up to a power of
    two, at most 4096, and it takes as many rows as fill 4096 elements (one row from K = 2049 on)."""
    block_k = min(4096, max(16, triton.next_power_of_2(k)))
    return 4096 // block_k, block_k


def bi_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """batchvl's RMSNorm of each row of x, each row's bits independent of the others and of their number.

    x [..., K] bfloat16/float16/float32, last dim contiguous, leading dims any stride that flattens to rows, on a
    CUDA GPU or on the CPU under TRITON_INTERPRET=1; weight [K] contiguous, x's dtype and device. Returns [..., K]
    in x's dtype (see the module docstring for the formula).
    """
    rows = as_rows(x, "bi_rmsnorm")  # [M, K]
    check_norm_params(rows, "bi_rmsnorm", weight=weight)
    check_triton_device(x, "bi_rmsnorm")
    m, k = rows.shape
    y = torch.empty((m, k), device=x.device, dtype=x.dtype)  # [M, K]
    if m:
        per, block_k = norm_tiles(k)
        _bi_rmsnorm_kernel[(triton.cdiv(m, per),)](rows, weight, y, m, rows.stride(0), y.stride(0), float(eps), K=k,
                                                   ROWS=per, BLOCK_K=block_k, num_warps=8)
    return y.view(x.shape)
