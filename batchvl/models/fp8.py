"""fp8 linear layers (W8A8 e4m3), swapped in for `nn.Linear` after the model is built, as gpt-fast does.

The model files know nothing of it: `to_fp8_modules` replaces chosen `nn.Linear`s (on the meta device, before
the weights exist, so that a bf16 copy of them is never made) and `quantize_model` replaces loaded ones. The
loader fills an `Fp8Linear` either from a bf16 checkpoint, quantizing each tensor (or row slice of a fused
weight) as it streams in (`quantize_weight`), or from a checkpoint already in fp8, as it is.

The arithmetic:
- weights: e4m3, one float32 scale per output channel: weight [out, in] float8_e4m3fn, weight_scale [out, 1],
  weight ~= weight.float() * weight_scale. Per-row scales make any row slice quantizable on its own, which
  is what lets a fused qkv or gate_up weight be quantized piece by piece while it loads.
- activations: quantized per token (row) on the fly, scale = max(amax(|row|), 1e-12) / 448, q = clamp(x /
  scale, -448, 448) cast to e4m3 (`quantize_rows`; on CUDA the engine hands in the fused Triton kernel of
  batchvl.kernels.fp8_quant, which has the same semantics);
- the product: `torch._scaled_mm` with row-wise scales, accumulating in float32, output in x's dtype.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from batchvl.kernels.fp8_quant import quantize_fp8_per_token_reference

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
QUANTIZE_ROWS_AT_ONCE = 4096  # weight rows quantized per step while loading: bounds the float32 temporaries

# The linear layers `engine.quantization: fp8` covers: every decoder layer's four (not the LM head, not the
# embeddings), and with `engine.quantize_vision` every InternViT block's four (not the projector, which runs on a
# quarter of the tokens after the pixel shuffle).
LM_LINEARS = re.compile(r"^lm\.layers\.\d+\.(qkv|o|gate_up|down)$")
VISION_LINEARS = re.compile(r"^vision\.vit\.blocks\.\d+\.(qkv|proj|fc1|fc2)$")

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# The per-token (per-row) quantization in plain torch: the activations' fallback where the engine hands in no
# kernel, and the per-output-channel weight quantization (a weight's rows are its output channels). One
# implementation with the Triton kernel's, bit for bit: scale = max(amax(|row|), 1e-12) / 448, q = e4m3 of
# clamp(x / scale, -448, 448), in float32.
quantize_rows = quantize_fp8_per_token_reference


def quantize_weight(w: torch.Tensor, rows_at_once: int = QUANTIZE_ROWS_AT_ONCE) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` of a weight [out, in] (or a row slice of one), a block of rows at a time so that the
    float32 temporaries stay small: the result does not depend on the block size (rows are independent)."""
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty((w.shape[0], 1), dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], rows_at_once):
        q[start : start + rows_at_once], scale[start : start + rows_at_once] = \
            quantize_rows(w[start : start + rows_at_once])
    return q, scale


def fits_scaled_mm(in_features: int, out_features: int) -> bool:
    """Whether torch._scaled_mm takes this layer: it needs K (in) and N (out) to be multiples of 16 (the shape
    checks of _scaled_mm_out_cuda in aten/src/ATen/native/cuda/ScaledBlas.cpp). Every InternVL shape fits."""
    return in_features % 16 == 0 and out_features % 16 == 0


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in e4m3 and per-output-channel scales, x quantized per token on the fly.

    Parameters: weight [out, in] float8_e4m3fn, weight_scale [out, 1] float32, bias [out] in the model's dtype
    (or None): the names and layout of compressed-tensors' FP8_DYNAMIC checkpoints, so those load as they are.

    forward:
    - on CUDA (when `fits_scaled_mm`): x [..., in] -> per-token quantization (`quantize_input`, the Triton kernel
      the engine sets, else `quantize_rows`) -> torch._scaled_mm(xq [M, in] row-major, weight.t() [in, out]
      column-major, scale_a [M, 1], scale_b [1, out], float32 scales, out_dtype x.dtype, bias fused for bf16/fp16);
    - elsewhere (the CPU, or a shape _scaled_mm refuses): emulation with the same quantized operands, both
      dequantized and multiplied in float32, then cast to x.dtype. The CPU tests check the arithmetic this way;
      it is slow and meant for that, and for shapes no InternVL model has.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.scaled_mm = fits_scaled_mm(in_features, out_features)
        self.quantize_input: Quantizer | None = None  # None: quantize_rows

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """A quantized copy of a loaded nn.Linear, on its device (the quantize-after-load path)."""
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        with torch.no_grad():
            q, scale = quantize_weight(w.detach())
            out.weight.copy_(q)
            out.weight_scale.copy_(scale)
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        if self.weight.device.type == "cuda" and self.scaled_mm:
            out = self._scaled_mm(x2, x.dtype)
        else:
            out = self._emulated(x2, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _scaled_mm(self, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        quantize = self.quantize_input or quantize_rows
        xq, x_scale = quantize(x2.contiguous())  # [M, in] e4m3, [M, 1] float32
        # _scaled_mm takes a bias only in bf16/fp16, matching the output's dtype (ScaledBlas.cpp).
        fused_bias = self.bias if dtype in (torch.bfloat16, torch.float16) else None
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.t(),
                               bias=fused_bias, out_dtype=dtype)  # [M, out]
        if self.bias is not None and fused_bias is None:
            out = out + self.bias
        return out

    def _emulated(self, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        xq, x_scale = quantize_rows(x2)
        out = (xq.float() * x_scale) @ (self.weight.float() * self.weight_scale).t()  # [M, out] float32
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(dtype)


def fp8_targets(model: nn.Module, vision: bool) -> list[str]:
    """The names of the nn.Linear modules `engine.quantization: fp8` replaces (see LM_LINEARS, VISION_LINEARS)."""
    patterns = [LM_LINEARS, VISION_LINEARS] if vision else [LM_LINEARS]
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(p.match(name) for p in patterns)]


def to_fp8_modules(model: nn.Module, names: Iterable[str], keep_misfits: bool = True) -> list[str]:
    """Replace the nn.Linear modules `names` with empty Fp8Linear ones of the same shape, on the same device
    (meta, before loading). A layer torch._scaled_mm cannot take (`fits_scaled_mm`) stays an nn.Linear when
    `keep_misfits` (it would only be emulated); names in a checkpoint already in fp8 are passed with
    keep_misfits False, since their weights exist only in fp8. Returns the names replaced."""
    done = []
    for name in sorted(names):
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not a linear layer")
        if keep_misfits and not fits_scaled_mm(linear.in_features, linear.out_features):
            log.info("%s (%d -> %d) stays in %s: torch._scaled_mm needs multiples of 16", name,
                     linear.in_features, linear.out_features, linear.weight.dtype)
            continue
        if not fits_scaled_mm(linear.in_features, linear.out_features):
            log.warning("%s (%d -> %d) is fp8 but torch._scaled_mm cannot take its shape: it runs emulated, "
                        "slowly", name, linear.in_features, linear.out_features)
        _replace(model, name, Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                        linear.weight.dtype, linear.weight.device))
        done.append(name)
    return done


def quantize_model(model: nn.Module, vision: bool) -> list[str]:
    """Quantize a loaded model in place: each linear layer of `fp8_targets` becomes an Fp8Linear holding its
    quantized weights. Loading with `quantization='fp8'` gives the same bytes without ever holding the model in
    bf16 on the device; this is the after-the-fact form of it. Returns the names replaced."""
    done = []
    for name in fp8_targets(model, vision):
        linear = model.get_submodule(name)
        if fits_scaled_mm(linear.in_features, linear.out_features):
            _replace(model, name, Fp8Linear.from_linear(linear))
            done.append(name)
    return done


def use_activation_quantizer(model: nn.Module, quantize: Quantizer | None) -> None:
    """Make every Fp8Linear of `model` quantize its input with `quantize` on CUDA (None: `quantize_rows`)."""
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.quantize_input = quantize


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

