"""RMSNorm fused with per-token fp8 quantization: the Triton kernel (under TRITON_INTERPRET=1, set in conftest)
against its torch reference, and the reference against batchvl's RMSNorm module followed by the quantization.

Its sm_90 compilation and the reference without triton are checked in test_fp8_quant.py.
"""

from __future__ import annotations

import pytest
import torch

from batchvl.kernels import fp8_quant, rmsnorm_fp8_quant, rmsnorm_quantize_fp8
from batchvl.models.layers import RMSNorm

reference = rmsnorm_fp8_quant.rmsnorm_quantize_fp8_reference
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def norm_inputs(m: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows over eight decades of scale (a zero row, an outlier row) and a weight around 1 with a few zeros
    and negatives, as trained norms have."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-4, 4, m)[:, None]
    if m > 1:
        x[1] = 0.0
    if m > 2:
        x[2, k // 3] = min(300 * x[2].abs().max().item(), torch.finfo(dtype).max)
    weight = 1 + 0.5 * torch.randn(k, generator=gen)
    weight[::11] = 0.0
    return x.to(dtype), weight.to(dtype)


SHAPES = [(1, 16), (3, 100), (16, 4096)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{m}-K{k}" for m, k in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernel_matches_reference_within_one_step(shape, dtype):
    """The documented tolerance: q at most one e4m3 step away, in at most 1% of the values; scales within
    two steps of the model dtype (the norm's sum and reciprocal square root round differently on the GPU)."""
    m, k = shape
    x, weight = norm_inputs(m, k, dtype, seed=m * 10_000 + k)
    q, scale = rmsnorm_quantize_fp8(x, weight, 1e-6)
    ref_q, ref_scale = reference(x, weight, 1e-6)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, k)
    assert scale.dtype == torch.float32 and scale.shape == (m, 1)
    steps = (q.view(torch.uint8).int() - ref_q.view(torch.uint8).int()).abs()
    assert steps.max() <= 1 and steps.count_nonzero() <= 0.01 * m * k
    torch.testing.assert_close(scale, ref_scale, rtol=2 * torch.finfo(dtype).eps, atol=0)
    if m > 1:
        zero_row_scale = torch.tensor([fp8_quant.EPS]) / torch.tensor([fp8_quant.FP8_MAX])
        assert scale[1].item() == zero_row_scale.item() and q[1].float().eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_is_batchvl_rmsnorm_then_the_per_token_quantization(dtype):
    x, weight = norm_inputs(6, 96, dtype, seed=2)
    norm = RMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        expected_q, expected_scale = fp8_quant.quantize_fp8_per_token_reference(norm(x))
    q, scale = reference(x, weight, 1e-5)
    torch.testing.assert_close(q.view(torch.uint8), expected_q.view(torch.uint8), rtol=0, atol=0)
    torch.testing.assert_close(scale, expected_scale, rtol=0, atol=0)


def test_batched_and_row_strided_inputs():
    x, weight = norm_inputs(6, 64, torch.bfloat16, seed=3)
    wide = torch.cat([x, x], 1)  # [6, 128]
    q, scale = rmsnorm_quantize_fp8(wide[:, 64:], weight, 1e-6)  # rows 128 apart
    q3, scale3 = rmsnorm_quantize_fp8(x.view(2, 3, 64), weight, 1e-6)  # [..., K] -> [M, K]
    ref_q, ref_scale = reference(x, weight, 1e-6)
    for got_q, got_scale in ((q, scale), (q3, scale3)):
        assert got_q.shape == (6, 64) and got_scale.shape == (6, 1)
        steps = (got_q.view(torch.uint8).int() - ref_q.view(torch.uint8).int()).abs()
        assert steps.max() <= 1
        torch.testing.assert_close(got_scale, ref_scale, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("fn", [rmsnorm_quantize_fp8, reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("x,weight,error,match", [
    (torch.ones(2, 16), [1.0] * 16, TypeError, "weight must be a torch.Tensor"),
    (torch.ones(2, 16), torch.ones(8), ValueError, r"weight must be \[16\] torch.float32"),
    (torch.ones(2, 16), torch.ones(16, dtype=torch.bfloat16), ValueError, "weight must be"),
    (torch.ones(2, 16), torch.ones(32)[::2], ValueError, "weight must be contiguous"),
    (torch.ones(2, 16, dtype=torch.int8), torch.ones(16), TypeError, "bfloat16, float16 or float32"),
    (torch.ones(16, 2).t(), torch.ones(16), ValueError, "last dimension must be contiguous"),
], ids=["weight-list", "weight-shape", "weight-dtype", "weight-strided", "x-int8", "x-transposed"])
def test_bad_inputs_are_refused_with_a_clear_message(fn, x, weight, error, match):
    with pytest.raises(error, match=match):
        fn(x, weight, 1e-6)


def test_rows_wider_than_one_program_holds_are_refused():
    k = rmsnorm_fp8_quant.MAX_K + 1
    with pytest.raises(ValueError, match="quantize_fp8_per_token"):
        rmsnorm_quantize_fp8(torch.ones(1, k), torch.ones(k), 1e-6)
