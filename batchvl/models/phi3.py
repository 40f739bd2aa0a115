"""Phi-3 (InternVL2-4B's language model): config and weights.

Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (gate first), which is already our
fused layout; its rotary scaling is `longrope` (formerly `su`) in the 128k-context models.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from batchvl.models import llama
from batchvl.models.decoder import DecoderSpec

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_NAMES = {
    "self_attn.qkv_proj": "qkv",
    "self_attn.o_proj": "o",
    "mlp.gate_up_proj": "gate_up",
    "mlp.down_proj": "down",
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_norm",
}


def spec_from_config(cfg: dict[str, Any]) -> DecoderSpec:
    return llama.spec_from_config(cfg, family="phi3", qkv_bias=False)


def map_weight(name: str, tensor: torch.Tensor, s: DecoderSpec) -> list[tuple[str, int, torch.Tensor]]:
    m = _LAYER.match(name)
    if not m:
        return llama.map_weight(name, tensor, s)
    proj, _, kind = m.group(2).rpartition(".")
    if proj not in _NAMES:
        raise KeyError(name)
    return [(f"layers.{m.group(1)}.{_NAMES[proj]}.{kind}", 0, tensor)]
