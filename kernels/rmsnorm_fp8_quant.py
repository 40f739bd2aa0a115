"""RMSNorm followed by per-token fp8 (e4m3) quantization, in one kernel, and its torch reference.

The decoder's input norms feed the qkv and gate_up linears; with fp8 linears the norm's output is needed only
as fp8 values and per-row scales. This kernel reads each row once and writes only q and the scale, where
RMSNorm then `quantize_fp8_per_token` would write the normed row and read it back. Per row of x [M, K]:

    y     = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)   as batchvl.models.layers.RMSNorm, in float32
    q, scale = quantize_fp8_per_token(y)                         see fp8_quant.py

One program holds a whole row in registers (K up to 16384, more than any hidden size of the InternVL
language models: 8192 for Llama-3-70B), so x is read once. The kernel matches the reference closely, not bit
for bit: its sum of squares adds in another order and its reciprocal square root is 1 / sqrt (each correctly
rounded; torch.rsqrt on the GPU is not), so a normed value may land one bfloat16 step away and, near a tie,
q one e4m3 step (the test bounds both).
"""

from __future__ import annotations

import torch

# triton and tl are None when triton is missing: see jit_when_triton
from batchvl.kernels.fp8_quant import (
    EPS,
    FP8_MAX,
    as_rows,
    check_kernel_device,
    jit_when_triton,
    quantize_fp8_per_token_reference,
    round_to_e4m3,
    tl,
    triton,
)

MAX_K = 16384


@jit_when_triton
def _round_to(v, dtype: tl.constexpr):
    """float32 v rounded to `dtype` (ties to even, as torch), kept as float32.

    bfloat16 is rounded on v's bits (keep the top 16, adding just under half of the dropped part, plus its
    lowest kept bit for ties): Triton's interpreter truncates a cast to bfloat16, the GPU rounds it; this
    gives the GPU's rounding in both. float16 casts round to nearest even in both.
    """
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    else:
        return v.to(dtype).to(tl.float32)


@jit_when_triton
def _rmsnorm_quantize_kernel(x_ptr, w_ptr, q_ptr, scale_ptr, stride_x, stride_q, eps, K: tl.constexpr,
                             EPS_: tl.constexpr, FP8_MAX_: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_K]
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(x * x, 0), K * 1.0) + eps))
    h = _round_to(x * rstd, x_ptr.dtype.element_ty)  # the norm's output in the model dtype
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = _round_to(w * h, x_ptr.dtype.element_ty)  # exact product of two bf16/fp16 values, rounded once, as torch
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(y), 0), EPS_), FP8_MAX_)
    tl.store(scale_ptr + row, scale)
    v = tl.minimum(tl.maximum(tl.div_rn(y, scale), -FP8_MAX_), FP8_MAX_)
    tl.store(q_ptr + row * stride_q + cols, round_to_e4m3(v).to(q_ptr.dtype.element_ty), mask=mask)


def check_norm_params(rows: torch.Tensor, name: str, **params: torch.Tensor | None) -> None:
    """Each of `params` (a norm's weight, bias) must be None or a contiguous [K] tensor in the rows' dtype and
    device (this kernel's and the batch-invariant norms')."""
    for what, p in params.items():
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(p).__name__}")
        if p.shape != (rows.shape[1],) or p.dtype != rows.dtype or p.device != rows.device:
            raise ValueError(f"{name}: {what} must be [{rows.shape[1]}] {rows.dtype} on {rows.device}, like x's "
                             f"rows; got {tuple(p.shape)} {p.dtype} on {p.device}")
        if p.stride(0) != 1 and p.shape[0] != 1:
            raise ValueError(f"{name}: {what} must be contiguous")


def rmsnorm_quantize_fp8_reference(x: torch.Tensor, weight: torch.Tensor, eps: float
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """batchvl's RMSNorm of x (weight [K] in x's dtype), then `quantize_fp8_per_token_reference`; plain torch.

    x [..., K] bfloat16/float16/float32, last dim contiguous. Returns q float8_e4m3fn [M, K] and scale float32
    [M, 1], M the product of the leading dims.
    """
    rows = as_rows(x, "rmsnorm_quantize_fp8_reference")  # [M, K]
    check_norm_params(rows, "rmsnorm_quantize_fp8_reference", weight=weight)
    h = rows.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [M, K]
    return quantize_fp8_per_token_reference(weight * h.to(rows.dtype))


def rmsnorm_quantize_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm and per-token fp8 quantization in one Triton kernel; close to the reference (see above).

    x [..., K] bfloat16/float16/float32 with K <= 16384, on a CUDA GPU with fp8 or on the CPU under
    TRITON_INTERPRET=1, last dim contiguous; weight [K] contiguous, x's dtype and device. Returns q
    float8_e4m3fn [M, K] and scale float32 [M, 1], M the product of the leading dims.
    """
    rows = as_rows(x, "rmsnorm_quantize_fp8")  # [M, K]
    check_norm_params(rows, "rmsnorm_quantize_fp8", weight=weight)
    check_kernel_device(x, "rmsnorm_quantize_fp8")
    m, k = rows.shape
    if k > MAX_K:
        raise ValueError(f"rmsnorm_quantize_fp8: K = {k} is over {MAX_K}, the widest row one program holds; "
                         "normalise, then use quantize_fp8_per_token")
    block_k = max(16, triton.next_power_of_2(k))
    q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m:
        _rmsnorm_quantize_kernel[(m,)](rows, weight, q, scale, rows.stride(0), q.stride(0), float(eps), K=k,
                                       EPS_=EPS, FP8_MAX_=FP8_MAX, BLOCK_K=block_k,
                                       num_warps=min(16, max(4, block_k // 512)))
    return q, scale
