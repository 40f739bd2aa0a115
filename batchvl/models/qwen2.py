"""Qwen2 / Qwen2.5 (InternVL2-1B, InternVL2.5 and InternVL3 language models): config and weights.

Qwen2 is Llama with a bias on q, k and v (none on o); its weights use Llama's names.
"""

from __future__ import annotations

from typing import Any

from batchvl.models import llama
from batchvl.models.decoder import DecoderSpec

map_weight = llama.map_weight


def spec_from_config(cfg: dict[str, Any]) -> DecoderSpec:
    spec = llama.spec_from_config(cfg, family="qwen2", qkv_bias=True)
    if cfg.get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention is not supported (no InternVL checkpoint uses it)")
    return spec
