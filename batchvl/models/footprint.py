"""How many bytes a model's weights take on the device, by part, in bf16 or with fp8 linear layers: from the
specs alone (no model is built), so that one can see before loading whether a shape fits a GPU.

Counted as batchvl builds the model: only the vision layers that run (`layers_to_run`), fused qkv and gate/up,
the LM head apart from the embeddings unless tied. An fp8 layer (`engine.quantization: fp8`) holds one byte per
weight element, a float32 scale per output row, and its bias in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchvl.models.decoder import DecoderSpec
from batchvl.models.internvit import VisionSpec

FP32_BYTES = 4


@dataclass(frozen=True)
class Linear:
    """One linear layer's shape: in, out features and whether it has a bias."""

    inp: int
    out: int
    bias: bool

    def params(self) -> int:
        return self.inp * self.out + (self.out if self.bias else 0)

    def bytes(self, itemsize: int, fp8: bool) -> int:
        if not fp8:
            return self.params() * itemsize
        return self.inp * self.out + self.out * FP32_BYTES + (self.out * itemsize if self.bias else 0)


def lm_linears(t: DecoderSpec) -> list[Linear]:
    """The linear layers of one decoder layer (the ones `engine.quantization: fp8` covers)."""
    return [Linear(t.hidden, t.q_width + 2 * t.kv_width, t.qkv_bias), Linear(t.q_width, t.hidden, t.o_bias),
            Linear(t.hidden, 2 * t.intermediate, t.mlp_bias), Linear(t.intermediate, t.hidden, t.mlp_bias)]


def vision_linears(v: VisionSpec) -> list[Linear]:
    """The linear layers of one InternViT block (those `engine.quantize_vision` covers)."""
    return [Linear(v.hidden, 3 * v.hidden, v.qkv_bias), Linear(v.hidden, v.hidden, True),
            Linear(v.hidden, v.intermediate, True), Linear(v.intermediate, v.hidden, True)]


def weight_bytes(v: VisionSpec, t: DecoderSpec, itemsize: int = 2, fp8_lm: bool = False,
                 fp8_vision: bool = False) -> dict[str, int]:
    """Bytes of the weights by part: `lm linears`, `lm embeddings + head`, `lm norms`, `vision linears`,
    `vision other` (embeddings, norms, layer scales, the projector) and `total`. `itemsize`: bytes per element
    of the model's dtype (2 for bf16)."""
    blocks = v.layers_to_run
    vit_other = (3 * v.patch_size**2 * v.hidden + v.hidden) + v.hidden + (v.grid**2 + 1) * v.hidden  # patch, cls, pos
    norm_params = v.hidden * (2 if v.norm == "layer" else 1)
    vit_other += blocks * (2 * norm_params + 2 * v.hidden + (2 * v.hidden if v.qk_norm else 0))  # norms, ls1, ls2
    width = v.hidden * int(round(1 / v.downsample_ratio)) ** 2
    projector = 2 * width + width * v.llm_hidden + v.llm_hidden + v.llm_hidden * v.llm_hidden + v.llm_hidden
    parts = {
        "lm linears": t.layers * sum(layer.bytes(itemsize, fp8_lm) for layer in lm_linears(t)),
        "lm embeddings + head": t.vocab * t.hidden * itemsize * (1 if t.tie_embeddings else 2),
        "lm norms": ((2 * t.layers + 1) * t.hidden + (2 * t.layers * t.head_dim if t.qk_norm else 0)) * itemsize,
        "vision linears": blocks * sum(layer.bytes(itemsize, fp8_vision) for layer in vision_linears(v)),
        "vision other": (vit_other + projector) * itemsize,
    }
    parts["total"] = sum(parts.values())
    return parts


def describe(v: VisionSpec, t: DecoderSpec, itemsize: int = 2, fp8_lm: bool = False, fp8_vision: bool = False,
             device_bytes: int | None = None) -> str:
    """One line: the weights' total and parts in GB (10^9 bytes), and what is left of `device_bytes` if given."""
    parts = weight_bytes(v, t, itemsize, fp8_lm, fp8_vision)
    shown = ", ".join(f"{k} {b / 1e9:.1f}" for k, b in parts.items() if k != "total")
    kind = ("fp8 LM" if fp8_lm else f"{8 * itemsize}-bit LM") + (" + fp8 vision" if fp8_vision else "")
    line = f"weights ({kind}): {parts['total'] / 1e9:.1f} GB ({shown})"
    if device_bytes is not None:
        left = device_bytes - parts["total"]
        line += (f"; {left / 1e9:.1f} GB of the device's {device_bytes / 1e9:.1f} GB left for activations and the "
                 "KV cache" if left > 0 else f"; does NOT fit the device's {device_bytes / 1e9:.1f} GB")
    return line
