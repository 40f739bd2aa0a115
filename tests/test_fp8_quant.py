"""Per-token fp8 quantization: the Triton kernel (under TRITON_INTERPRET=1, set in conftest) against its torch
reference, the reference against the definition, the kernel compiled for Hopper, and the package without triton.

The GPU run of the same comparison is `batchvl bench-kernels` (see BENCHMARKS.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from batchvl.kernels import fp8_quant, quantize_fp8_per_token

EPS, FP8_MAX = fp8_quant.EPS, fp8_quant.FP8_MAX
quantize_fp8_per_token_reference = fp8_quant.quantize_fp8_per_token_reference

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def hostile_rows(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian rows whose scales span the dtype's range, with a zero row, an outlier row (its other values
    fall into e4m3's subnormals or to zero) and signed zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    lo, hi = (-4, 4) if dtype == torch.float16 else (-30, 30)
    x *= torch.logspace(lo, hi, m, dtype=torch.float64)[:, None] if m > 1 else 1.0
    if m > 1:
        x[1] = 0.0
    if m > 2:
        x[2, k // 2] = min(1e4 * x[2].abs().max().item(), torch.finfo(dtype).max)
    x[0, 1::7] = -0.0
    return x.to(dtype)


# (rows, K, block_k): one chunk, one masked chunk, several chunks with a partial last one, two full chunks of
# the default 2048.
SHAPES = [(1, 16, None), (3, 100, None), (3, 100, 32), (64, 4096, None)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{m}-K{k}-B{b}" for m, k, b in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernel_equals_reference_bit_for_bit(shape, dtype):
    m, k, block_k = shape
    x = hostile_rows(m, k, dtype, seed=m * 10_000 + k)
    q, scale = quantize_fp8_per_token(x, block_k=block_k)
    ref_q, ref_scale = quantize_fp8_per_token_reference(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, k)
    assert scale.dtype == torch.float32 and scale.shape == (m, 1)
    torch.testing.assert_close(bits(q), bits(ref_q), rtol=0, atol=0)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_reconstructs_each_row_within_half_an_e4m3_step(dtype):
    x = hostile_rows(8, 300, dtype, seed=1)
    q, scale = quantize_fp8_per_token_reference(x)
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(scale, amax.clamp(min=EPS) / FP8_MAX, rtol=1e-7, atol=0)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert bits(q[1]).eq(0).all()  # the zero row: finite scale, q = +0
    # e4m3 keeps 3 mantissa bits: within 2^-4 of |x| for normals, half a subnormal step (2^-10) below 2^-6.
    err = (q.float() * scale - xf).abs()
    assert (err <= torch.maximum(xf.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)).all()
    assert (q.float().abs().amax(-1)[amax[:, 0] >= EPS] == FP8_MAX).all()  # each row's largest lands on 448


def e4m3_grid_row() -> torch.Tensor:
    """One float32 row whose scale is exactly 1 (it holds 448) and whose other values are every finite e4m3
    value, the midpoints between neighbours (the ties) and the floats next to each midpoint, with both signs."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # +0 .. 448, ascending
    mid = (grid[:-1] + grid[1:]) / 2
    values = torch.cat([grid, mid, torch.nextafter(mid, torch.tensor(0.0)), torch.nextafter(mid, torch.tensor(1e9)),
                        torch.tensor([2.0**-11, 2.0**-10 * 1.0001, 1e-30])])
    return torch.cat([values, -values, torch.tensor([FP8_MAX])])[None]


def test_rounding_is_to_nearest_even_at_every_e4m3_tie():
    x = e4m3_grid_row()
    ref_q, ref_scale = quantize_fp8_per_token_reference(x)
    assert ref_scale.item() == 1.0
    # torch's cast, spelled out: ties go to the even mantissa, in the normal and the subnormal range.
    half = torch.tensor([[1.0625, 1.1875, 1.5 * 2**-9, 2.5 * 2**-9, 0.5 * 2**-9, -0.0, 448.0]])
    torch.testing.assert_close(quantize_fp8_per_token_reference(half)[0].float(),
                               torch.tensor([[1.0, 1.25, 2**-8, 2 * 2**-9, 0.0, -0.0, 448.0]]), rtol=0, atol=0)
    q, scale = quantize_fp8_per_token(x)
    assert scale.item() == 1.0
    torch.testing.assert_close(bits(q), bits(ref_q), rtol=0, atol=0)
    torch.testing.assert_close(bits(q)[0, :127], torch.arange(0, 127, dtype=torch.uint8), rtol=0, atol=0)


def test_batched_strided_and_empty_inputs():
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(6, 80, generator=gen).to(torch.bfloat16)
    x = wide[:, :50]  # rows 80 apart: the kernel follows the row stride
    q, scale = quantize_fp8_per_token(x)
    ref_q, ref_scale = quantize_fp8_per_token_reference(x.contiguous())
    torch.testing.assert_close(bits(q), bits(ref_q), rtol=0, atol=0)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    q3, scale3 = quantize_fp8_per_token(wide.view(2, 3, 80))  # [..., K] -> [M, K], M = 6
    assert q3.shape == (6, 80) and scale3.shape == (6, 1)
    torch.testing.assert_close(bits(q3), bits(quantize_fp8_per_token_reference(wide)[0]), rtol=0, atol=0)
    q0, scale0 = quantize_fp8_per_token(torch.zeros(0, 32))
    assert q0.shape == (0, 32) and scale0.shape == (0, 1)


@pytest.mark.parametrize("fn", [quantize_fp8_per_token, quantize_fp8_per_token_reference],
                         ids=["kernel", "reference"])
@pytest.mark.parametrize("x,error,match", [
    ([[1.0, 2.0]], TypeError, "torch.Tensor"),
    (torch.ones(2, 16, dtype=torch.int32), TypeError, "bfloat16, float16 or float32"),
    (torch.ones(2, 16, dtype=torch.float64), TypeError, "bfloat16, float16 or float32"),
    (torch.ones(16), ValueError, r"\[M, K\]"),
    (torch.ones(2, 0), ValueError, "K >= 1"),
    (torch.ones(16, 2).t(), ValueError, "last dimension must be contiguous"),
    (torch.ones(3, 4, 16).transpose(0, 1), ValueError, "without a copy"),
], ids=["list", "int32", "float64", "1d", "k0", "transposed", "unflattenable"])
def test_bad_inputs_are_refused_with_a_clear_message(fn, x, error, match):
    with pytest.raises(error, match=match):
        fn(x)


def test_block_k_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="block_k"):
        quantize_fp8_per_token(torch.ones(2, 64), block_k=48)


def _run(script: str, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_kernels_compile_for_hopper_with_exact_division_and_an_e4m3_store():
    """Without a GPU: Triton compiles both fp8 kernels (this file's and rmsnorm_fp8_quant's) for sm_90 here, to
    PTX and a cubin, which the interpreter never does. The PTX must divide correctly rounded (`/` would be
    approximate) and convert to e4m3 in hardware; outside the interpreter a CPU tensor is refused."""
    out = _run("""
        import torch, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from batchvl.kernels import fp8_quant, rmsnorm_fp8_quant
        try:
            fp8_quant.quantize_fp8_per_token(torch.ones(2, 16))
        except ValueError as e:
            print("refused:", e)
        common = {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "stride_x": "i32", "stride_q": "i32",
                  "K": "constexpr", "EPS_": "constexpr", "FP8_MAX_": "constexpr", "BLOCK_K": "constexpr"}
        consts = {"K": 3584, "EPS_": fp8_quant.EPS, "FP8_MAX_": fp8_quant.FP8_MAX}
        for x in ("bf16", "fp16", "fp32"):
            for kernel, sig, block in (
                    (fp8_quant._quantize_kernel, {"x_ptr": "*" + x, **common}, 2048),
                    (rmsnorm_fp8_quant._rmsnorm_quantize_kernel,
                     {"x_ptr": "*" + x, "w_ptr": "*" + x, **common, "eps": "fp32"}, 4096)):
                k = triton.compile(ASTSource(kernel, sig, constexprs={**consts, "BLOCK_K": block}),
                                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
                ptx = k.asm["ptx"]
                print(kernel.__name__, x, "cubin" in k.asm, "div.rn.f32" in ptx,
                      "div.full" in ptx or "div.approx" in ptx, "cvt.rn.satfinite.e4m3x2.f32" in ptx)
    """, TRITON_INTERPRET="0")
    assert "refused: quantize_fp8_per_token: x is on cpu; the kernel needs a CUDA GPU" in out
    for x in ("bf16", "fp16", "fp32"):
        for name in ("_quantize_kernel", "_rmsnorm_quantize_kernel"):
            assert f"{name} {x} True True False True" in out, out


def test_references_import_and_run_without_triton():
    out = _run("""
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch
        from batchvl.kernels.fp8_quant import quantize_fp8_per_token, quantize_fp8_per_token_reference
        from batchvl.kernels.rmsnorm_fp8_quant import rmsnorm_quantize_fp8_reference
        q, scale = quantize_fp8_per_token_reference(torch.tensor([[1.0, -2.0, 0.5]]))
        print(q.float().tolist(), scale.tolist())
        q, scale = rmsnorm_quantize_fp8_reference(torch.tensor([[3.0, -3.0]]), torch.tensor([1.0, 0.5]), 0.0)
        print("norm", q.float().tolist(), scale.tolist())
        for name in ("quantize_fp8_per_token", "rmsnorm_quantize_fp8", "decode_attention"):
            try:
                exec(f"from batchvl.kernels import {name}")
            except ImportError as e:
                print("ImportError:", e)
        try:
            quantize_fp8_per_token(torch.ones(1, 4))
        except ImportError as e:
            print("ImportError:", e)
    """)
    scale = (torch.tensor([[2.0]]) / torch.tensor([[FP8_MAX]])).tolist()
    assert f"[[224.0, -448.0, 112.0]] {scale}" in out, out
    scale = (torch.tensor([[1.0]]) / torch.tensor([[FP8_MAX]])).tolist()
    assert f"norm [[448.0, -224.0]] {scale}" in out, out
    for name in ("quantize_fp8_per_token", "rmsnorm_quantize_fp8", "decode_attention"):
        assert f"ImportError: batchvl.kernels.{name} needs triton" in out
    assert "ImportError: quantize_fp8_per_token needs triton" in out
