"""Qwen3 (InternVL3.5-1B ... -38B language models): config and weights.

Qwen3 is Llama with an RMSNorm over each head's `head_dim` on q and k (`self_attn.q_norm` / `k_norm`, one weight
[head_dim] shared by the heads), applied before the rotary embedding, and no qkv bias. Its `head_dim` is its own
config value (128 in the dense Qwen3 models, and transformers' default when the config has none), which need not
be hidden / heads: Qwen3-0.6B (InternVL3.5-1B) has 16 heads of 128 over a hidden size of 1024. The mixture-of-
experts Qwen3 (`Qwen3MoeForCausalLM`) is another family, refused by batchvl.models.families.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from batchvl.models import llama
from batchvl.models.decoder import DecoderSpec

QWEN3_HEAD_DIM = 128  # Qwen3Config's default head_dim
_QK_NORM = re.compile(r"^layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight$")


def spec_from_config(cfg: dict[str, Any]) -> DecoderSpec:
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
        raise ValueError("Qwen3 sliding-window attention is not supported (no InternVL checkpoint uses it)")
    cfg = dict(cfg, head_dim=cfg.get("head_dim") or QWEN3_HEAD_DIM)
    return dataclasses.replace(llama.spec_from_config(cfg, family="qwen3"), qk_norm=True)


def map_weight(name: str, tensor: torch.Tensor, s: DecoderSpec) -> list[tuple[str, int, torch.Tensor]]:
    """Llama's names, and `layers.N.self_attn.{q,k}_norm.weight` -> `layers.N.{q,k}_norm.weight`."""
    m = _QK_NORM.match(name)
    if m:
        return [(f"layers.{m.group(1)}.{m.group(2)}.weight", 0, tensor)]
    return llama.map_weight(name, tensor, s)
