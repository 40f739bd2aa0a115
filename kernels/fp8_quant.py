"""Dynamic per-token fp8 (e4m3) quantization of activations, fused in one kernel, and its torch reference.

W8A8 fp8 linears (`torch._scaled_mm` with rowwise scales) need each activation row as float8_e4m3fn values q
and one float32 scale, with x ≈ q * scale. Done as separate eager ops (amax, divide, cast) it costs as much as
the fp8 matrix product saves; here it is one kernel launch that writes only q and the scales. For each row
of x [M, K]:

    scale = max(amax(|x_row|), EPS) / 448        448 = torch.finfo(torch.float8_e4m3fn).max
    q     = e4m3(clamp(x_row / scale, -448, 448))  rounded to nearest, ties to even, as torch's cast

all in float32 with correctly rounded divisions, so the kernel's q equals the reference's bit for bit and its
scale is the same float32. EPS = 1e-12 keeps an all-zero row finite: scale 1e-12 / 448, q all zero (a row
whose amax is under EPS is scaled as if its amax were EPS). Inputs must be finite: an inf or NaN spoils its
row's q and scale, and there the kernel and the reference may disagree (not tested).

The kernel runs one program per row and reads the row twice, in BLOCK_K chunks: once for its amax, once to
quantize. Any K works with a bounded register footprint, and the second read of a row (tens of KB at most)
usually comes from L2. A row is never split between programs, so no cross-program reduction is needed; the
cost is that decode-sized M (64 rows) fills only part of the GPU, where the call takes microseconds anyway.
K is a compile-time constant: one compilation per width (a model has two or three: hidden, intermediate),
fixed trip counts, and Triton's interpreter cannot loop to a runtime bound (it fails on numpy 2.4).

The rounding to e4m3 is done in float32 arithmetic (`round_to_e4m3`) and the final cast to float8 only
changes the container: it receives a value that e4m3 holds exactly. Triton's interpreter converts to fp8
without saturation and rounds halves up (and mis-carries a rounded-up mantissa), so a plain cast would not
match torch there; on the GPU the hardware conversion of an exact value is exact. So the same code, float8
output included, runs under TRITON_INTERPRET=1 in the tests and on the GPU.

This file imports without triton: the engine then uses `quantize_fp8_per_token_reference`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the torch reference below still works: it is the engine's fallback
    triton = tl = None
    _NO_TRITON = e

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
EPS = 1e-12  # the smallest amax a scale is taken from: an all-zero row gets a finite scale and q = 0
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def jit_when_triton(fn):
    """triton.jit when triton imports; without it the kernel is left undecorated and never launched (the
    wrappers raise first), so that the references still import."""
    return triton.jit(fn) if triton is not None else fn


@jit_when_triton
def round_to_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, still as float32 (shared with
    the fused kernels that end in fp8).

    e4m3 keeps 3 mantissa bits: the step is 2^(e - 3) for |v| in [2^e, 2^(e + 1)), and 2^-9 below 2^-6.
    Adding c = 2^(e + 20) makes float32 itself round |v| to that step (the sum's step is 2^(e - 3)), ties to
    even; subtracting c is then exact. The product forming c is a power of two, exact even if fused.
    The sign is put back from v's bits, so -0.0 and tiny negatives give -0.0, as torch's cast does.
    """
    bits = v.to(tl.int32, bitcast=True)
    mag = tl.abs(v)
    binade = (bits & 0x7F800000).to(tl.float32, bitcast=True)  # 2^e, or 0 for zero and float32 subnormals
    c = tl.maximum(binade, 0.015625) * 1048576.0  # 2^-6: e4m3's smallest normal; 2^20
    rounded = (mag + c) - c
    return (rounded.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@jit_when_triton
def _quantize_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, K: tl.constexpr, EPS_: tl.constexpr,
                     FP8_MAX_: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 past 2^31 elements
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    cols = tl.arange(0, BLOCK_K)
    # Pass 1: the row's amax, element-wise over chunks, reduced once at the end.
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.div_rn(tl.maximum(tl.max(amax, 0), EPS_), FP8_MAX_)
    tl.store(scale_ptr + row, scale)
    # Pass 2: divide (correctly rounded, as torch's division; Triton's `/` is approximate), clamp, round, cast.
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + cols < K
        x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.div_rn(x, scale), -FP8_MAX_), FP8_MAX_)
        tl.store(q_row + k0 + cols, round_to_e4m3(v).to(q_ptr.dtype.element_ty), mask=mask)


def as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x [..., K] as [M, K] without copying, after checking what the kernel and the reference both need."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() < 2 or x.shape[-1] == 0:
        raise ValueError(f"{name}: x must be [M, K] or [..., K] with K >= 1, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        raise ValueError(f"{name}: x's last dimension must be contiguous, got strides {x.stride()}")
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"{name}: x's leading dimensions must flatten to rows without a copy, got shape "
                         f"{tuple(x.shape)} and strides {x.stride()}") from e


def quantize_fp8_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's semantics in plain torch (any device, no triton): the fallback on the CPU.

    x [..., K] bfloat16/float16/float32, last dim contiguous. Returns q float8_e4m3fn [M, K] and scale
    float32 [M, 1], M the product of the leading dims, with x ≈ q.float() * scale (see the module docstring).
    """
    rows = as_rows(x, "quantize_fp8_per_token_reference").float()  # [M, K]
    amax = rows.abs().amax(-1, keepdim=True).clamp(min=EPS)  # [M, 1]
    # Divided by a tensor, not by the number 448: on CUDA torch turns division by a Python number into
    # multiplication by its reciprocal, which can be one bit off the correctly rounded quotient.
    scale = amax / torch.full_like(amax, FP8_MAX)  # [M, 1]
    q = (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # [M, K]
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor, block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp8 quantization in one Triton kernel; the same q (bit for bit) and scale as the reference.

    x [..., K] bfloat16/float16/float32 on a CUDA GPU with fp8 (compute capability 8.9 or later: Ada, Hopper),
    or on the CPU under TRITON_INTERPRET=1; the last dim contiguous, the leading dims any stride that
    flattens to rows. Returns q float8_e4m3fn [M, K] and scale float32 [M, 1], M the product of the leading
    dims. `block_k` (a power of two >= 16) is the chunk a program reads at a time; by default K rounded up to
    a power of two, at most 2048.
    """
    rows = as_rows(x, "quantize_fp8_per_token")
    check_kernel_device(x, "quantize_fp8_per_token")
    m, k = rows.shape
    if block_k is None:
        block_k = min(2048, max(16, triton.next_power_of_2(k)))
    elif block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"quantize_fp8_per_token: block_k must be a power of two >= 16, got {block_k}")
    q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m:
        _quantize_kernel[(m,)](rows, q, scale, rows.stride(0), q.stride(0), K=k, EPS_=EPS, FP8_MAX_=FP8_MAX,
                               BLOCK_K=block_k, num_warps=4 if block_k <= 1024 else 8)
    return q, scale


def check_triton_device(x: torch.Tensor, name: str, reference: str | None = None) -> None:
    """Raise unless a Triton kernel can run on x: triton imports, and x is on a CUDA GPU or on the CPU under
    Triton's interpreter (TRITON_INTERPRET=1 when the kernels were made). `reference`: the torch function to name
    in the error instead."""
    if triton is None:
        hint = f"; use {reference}" if reference else ""
        raise ImportError(f"{name} needs triton ({_NO_TRITON}){hint}") from _NO_TRITON
    if x.device.type == "cuda":
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(round_to_e4m3, InterpretedFunction):  # TRITON_INTERPRET=1 was not set when it was made
        hint = f". Use {reference} there" if reference else ""
        raise ValueError(f"{name}: x is on {x.device}; the kernel needs a CUDA GPU (or TRITON_INTERPRET=1 on the "
                         f"CPU){hint}")


def check_kernel_device(x: torch.Tensor, name: str) -> None:
    """Raise unless the fp8 kernels can run on x: check_triton_device, and a CUDA GPU with fp8 (compute
    capability 8.9 or later)."""
    check_triton_device(x, name, f"{name}_reference")
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 9):
        raise ValueError(f"{name}: {torch.cuda.get_device_name(x.device)} has no fp8 (compute capability 8.9 "
                         "or later needed)")
