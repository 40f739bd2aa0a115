"""fp8 (W8A8 e4m3): the quantization arithmetic and the Fp8Linear layer.

On the CPU, Fp8Linear multiplies the quantized operands dequantized in float32 (its emulation); the CUDA path's
torch._scaled_mm call is checked here too where this torch runs _scaled_mm on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchvl.models.fp8 import FP8_DTYPE, Fp8Linear, fits_scaled_mm, quantize_rows, quantize_weight, to_fp8_modules


def spec_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification, written out in float64: scale = max(amax|row|, 1e-12) / 448, q = clamp(x / scale)."""
    x = x.double()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
    return (x / scale).clamp(-448, 448), scale


# --- the arithmetic -------------------------------------------------------------------------------------------

def test_rows_round_trip_within_half_an_e4m3_step_of_their_own_scale():
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-4, 4, 9)[:, None]  # rows 1e8 apart: each needs its own scale
    x = torch.randn(9, 256, generator=gen) * magnitudes
    q, scale = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and scale.shape == (9, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself; below 2^-6 (subnormals) by at
    # most half the smallest step, 2^-10, of the row's scale.
    bound = x.abs() * 2.0**-4 + scale * 2.0**-10
    assert bool(((back - x).abs() <= bound * (1 + 1e-6)).all())
    assert torch.equal(q.float().abs().amax(-1), torch.full((9,), 448.0))  # each row's largest value maps to 448
    rel = ((back - x).norm(dim=-1) / x.norm(dim=-1))
    assert bool((rel < 0.05).all()) and bool((rel > 1e-4).all()), rel  # small, and not a no-op


def test_a_zero_row_stays_zero_with_the_floor_scale():
    x = torch.zeros(3, 32)
    x[1] = torch.linspace(-2, 2, 32)
    q, scale = quantize_rows(x)
    assert torch.equal(q[0].float(), torch.zeros(32)) and torch.equal(q[2].float(), torch.zeros(32))
    assert scale[0].item() == pytest.approx(1e-12 / 448) and scale[1].item() == pytest.approx(2 / 448)
    assert not bool((q.float() * scale).isnan().any())


def test_quantization_follows_the_specification_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(17, 48, generator=gen) * 3).to(dtype)
        q, scale = quantize_rows(x)
        expected, expected_scale = spec_quantize(x.float())
        torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)
        # The cast rounds to nearest; computed in float32 the quotient may sit one float32 step off the float64
        # one, which changes the e4m3 result only at an exact tie: allow one e4m3 step there, nowhere else.
        steps = (q.float().double() - expected).abs() / expected.abs().clamp(min=2.0**-6) * 8
        assert bool((steps <= 1.0001).all())


def test_per_channel_scales_make_any_row_slice_quantize_on_its_own():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 64, generator=gen) * torch.logspace(-3, 3, 40)[:, None]
    q, scale = quantize_weight(w)
    q_blocks, scale_blocks = quantize_weight(w, rows_at_once=7)  # as a fused weight's slices arrive
    assert torch.equal(q.view(torch.uint8), q_blocks.view(torch.uint8)) and torch.equal(scale, scale_blocks)
    q_slice, scale_slice = quantize_rows(w[13:29])
    assert torch.equal(q[13:29].view(torch.uint8), q_slice.view(torch.uint8)) and torch.equal(scale[13:29], scale_slice)


def test_matches_the_kernels_torch_reference_once_it_exists():
    kernels = pytest.importorskip("batchvl.kernels.fp8_quant", reason="kernels/fp8_quant.py has not landed yet")
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    x[4] = 0
    q, scale = quantize_rows(x)
    q_ref, scale_ref = kernels.quantize_fp8_per_token_reference(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)


# --- the layer ------------------------------------------------------------------------------------------------

def reference_linear(x: torch.Tensor, layer: Fp8Linear) -> torch.Tensor:
    """The layer's result in float64, from the specification's quantized input and the layer's fp8 weight."""
    xq, x_scale = spec_quantize(x.reshape(-1, layer.in_features).float())
    xq = xq.float().to(FP8_DTYPE).double()  # the specification's values, rounded to e4m3 as stored
    w = layer.weight.double() * layer.weight_scale.double()
    out = (xq * x_scale) @ w.t() + (0 if layer.bias is None else layer.bias.double())
    return out.reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_equals_a_float64_product_of_the_same_quantized_operands(dtype):
    gen = torch.Generator().manual_seed(4)
    dense = nn.Linear(96, 48).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(48, 96, generator=gen) * torch.logspace(-2, 1, 48)[:, None])
        dense.bias.copy_(torch.randn(48, generator=gen))
    layer = Fp8Linear.from_linear(dense)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.shape == (48, 1) and layer.bias.dtype == dtype
    x = (torch.randn(2, 5, 96, generator=gen) * 4).to(dtype)
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), reference_linear(x, layer), rtol=tol, atol=tol)
    error = (out.double() - dense(x).double()).norm() / dense(x).double().norm()
    assert 1e-4 < error < 0.08  # fp8 changes the result, by a few percent at most


@pytest.mark.parametrize("dtype, bias", [(torch.bfloat16, True), (torch.float32, True), (torch.bfloat16, False)])
def test_the_cuda_path_scaled_mm_call_computes_the_same(dtype, bias):
    """Fp8Linear's torch._scaled_mm call (operand layout, scale shapes, bias), run where torch has it on the CPU."""
    gen = torch.Generator().manual_seed(5)
    layer = Fp8Linear.from_linear(nn.Linear(64, 32, bias=bias).to(dtype))
    x = torch.randn(7, 64, generator=gen).to(dtype)
    try:
        out = layer._scaled_mm(x, dtype)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch has no CPU torch._scaled_mm: {e}")
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), reference_linear(x, layer), rtol=tol, atol=tol)
    torch.testing.assert_close(out, layer._emulated(x, dtype), rtol=tol, atol=tol)


def test_shapes_scaled_mm_refuses_stay_dense_unless_the_checkpoint_is_fp8():
    assert fits_scaled_mm(4096, 4608) and not fits_scaled_mm(4096, 4600) and not fits_scaled_mm(100, 64)
    model = nn.Module()
    model.a, model.b = nn.Linear(64, 40), nn.Linear(32, 32)
    assert to_fp8_modules(model, ["a", "b"]) == ["b"]
    assert isinstance(model.a, nn.Linear) and isinstance(model.b, Fp8Linear)
    assert to_fp8_modules(model, ["a"], keep_misfits=False) == ["a"] and not model.a.scaled_mm
