"""A batch-invariant matrix product for linear layers: y = x @ w.T (+ bias), each row's bits independent of M.

cuBLAS picks its algorithm (tile shape, split-K, stream-K) from all three dimensions of a product, so the same
input row can come out with different rounding in a batch of 8 rows than in a batch of 64: its reduction over K
ran in another order. Here the order is fixed by N and K alone:

- one program per (BLOCK_M rows, BLOCK_N columns) tile; BLOCK_M is a constant and BLOCK_N and BLOCK_K are chosen
  from N and K, never from M;
- each program walks K from 0 upwards in BLOCK_K steps, accumulating in float32 (no split-K: a row's sum is never
  cut between programs), then adds the bias in float32 and rounds once to x's dtype.

An output element is thus the same float32 sum, in the same order, whatever M is and wherever its row sits in x:
the rows of a tile do not interact (a matrix product computes each output element from its own row and column),
and a tile that runs past M only masks its loads and stores. The test checks it bit for bit (torch.equal) in
batches of 1, 3 and 8, and that another BLOCK_K (what an M-dependent choice would amount to) changes the bits.

On the GPU, operands go into `tl.dot` in their own dtype (bf16/fp16 products are exact in the float32
accumulator; float32 inputs use IEEE float32 products, not tf32): a tensor-core instruction sums each output
element over its k-slice in an order fixed by the instruction, whatever the element's row. Triton's interpreter
runs `tl.dot` as numpy's matmul, whose BLAS does not: a row came out with other bits at position 6 of a block
than at position 0 (OpenBLAS, float32). Under the interpreter the kernel therefore forms the block's products
and sums each element's own BLOCK_K of them (numpy's pairwise sum over a contiguous axis, the same for every
element): the same sequence of k-blocks, a different sum inside a block.

This file imports without triton: `bi_matmul_reference` still works.
"""

from __future__ import annotations

import torch

# triton and tl are None when triton is missing: see jit_when_triton
from batchvl.kernels.fp8_quant import as_rows, check_triton_device, jit_when_triton, tl, triton

BLOCK_M = 64  # rows per program: a constant, so that nothing about a row's sum depends on M
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@jit_when_triton
def _bi_matmul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, stride_x, stride_w, stride_y, K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M_: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 past 2^31 elements
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M_ + tl.arange(0, BLOCK_M_)  # [BLOCK_M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M_, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a compile-time constant: a fixed trip count, always in this order
        k_ok = k0 + ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + cols[:, None] * stride_w + (k0 + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BLOCK_N, BLOCK_K]
        if DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] float32
        else:  # the interpreter: each element's own sum over the block, the same code for every row
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> None:
    for what, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: x must be bfloat16, float16 or float32, got {x.dtype}")
    if weight.dim() != 2 or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"{name}: weight must be [N, K] in x's dtype and device ({x.dtype}, {x.device}); got "
                         f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: x must be [..., K] with K = {weight.shape[1]} (weight's in-features); got shape "
                         f"{tuple(x.shape)}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"{name}: bias must be [{weight.shape[0]}] {x.dtype} on {x.device}; got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")


def bi_matmul_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's arithmetic in plain torch, up to summation order: float32 product and bias, rounded once to
    x's dtype. x [..., K], weight [N, K], bias [N] or None -> [..., N]. Not batch-invariant itself."""
    _check(x, weight, bias, "bi_matmul_reference")
    y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def bi_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias with each row's result independent of the other rows and of how many there are.

    x [..., K] bfloat16/float16/float32 (the last dim contiguous, the leading dims any stride that flattens to
    rows); weight [N, K] (nn.Linear's layout, last dim contiguous) and bias [N] or None, in x's dtype and on its
    device: a CUDA GPU, or the CPU under TRITON_INTERPRET=1. Returns [..., N] in x's dtype, accumulated in
    float32. `block_n` and `block_k` (powers of two >= 16) override the tiles chosen from N and K; they change
    the rounding of every row alike (the reduction order), never per M.
    """
    _check(x, weight, bias, "bi_matmul")
    check_triton_device(x, "bi_matmul", "bi_matmul_reference")
    if weight.stride(1) != 1 or x.stride(-1) != 1:
        raise ValueError(f"bi_matmul: the last dims of x and weight must be contiguous; got strides {x.stride()}, "
                         f"{weight.stride()}")
    n, k = weight.shape
    rows = as_rows(x, "bi_matmul")  # [M, K]
    block_n = block_n or (128 if n >= 128 else max(16, triton.next_power_of_2(n)))
    block_k = block_k or (64 if k >= 64 else max(16, triton.next_power_of_2(k)))
    for what, b in (("block_n", block_n), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"bi_matmul: {what} must be a power of two >= 16, got {b}")
    m = rows.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)  # [M, N]
    if m and n:
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, block_n))
        _bi_matmul_kernel[grid](rows, weight, weight if bias is None else bias, y, m, n, rows.stride(0),
                                weight.stride(0), y.stride(0), K=k, HAS_BIAS=bias is not None,
                                DOT=x.device.type == "cuda",
                                PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M_=BLOCK_M,
                                BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return y.view(*x.shape[:-1], n)

