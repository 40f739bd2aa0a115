"""Llama (InternVL2-40B/-76B language models, and transformers-converted InternVL2.5): config and weights.

The Llama weight names (`layers.N.self_attn.q_proj`, `mlp.gate_proj`, ...) are also Qwen2's, so the
mapping here is shared with qwen2.py.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from batchvl.models.decoder import DecoderSpec
from batchvl.models.rope import RopeSpec

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def head_dim_of(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def spec_from_config(cfg: dict[str, Any], family: str = "llama", qkv_bias: bool | None = None) -> DecoderSpec:
    attention_bias = bool(cfg.get("attention_bias", False))
    return DecoderSpec(
        family=family,
        vocab=int(cfg["vocab_size"]),
        hidden=int(cfg["hidden_size"]),
        layers=int(cfg["num_hidden_layers"]),
        heads=int(cfg["num_attention_heads"]),
        kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        head_dim=head_dim_of(cfg),
        intermediate=int(cfg["intermediate_size"]),
        eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=RopeSpec.from_hf_config(cfg),
        max_positions=int(cfg.get("max_position_embeddings", 4096)),
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def map_weight(name: str, tensor: torch.Tensor, s: DecoderSpec) -> list[tuple[str, int, torch.Tensor]]:
    """An LM weight name (without the `model.` prefix) -> [(our parameter, row offset, tensor)]."""
    if name == "embed_tokens.weight":
        return [("embed.weight", 0, tensor)]
    if name in ("norm.weight", "lm_head.weight"):
        return [(name, 0, tensor)]
    m = _LAYER.match(name)
    if not m:
        raise KeyError(name)
    i, rest = m.group(1), m.group(2)
    proj, _, kind = rest.rpartition(".")  # kind: weight | bias
    offsets = {
        "self_attn.q_proj": ("qkv", 0),
        "self_attn.k_proj": ("qkv", s.q_width),
        "self_attn.v_proj": ("qkv", s.q_width + s.kv_width),
        "self_attn.o_proj": ("o", 0),
        "mlp.gate_proj": ("gate_up", 0),
        "mlp.up_proj": ("gate_up", s.intermediate),
        "mlp.down_proj": ("down", 0),
        "input_layernorm": ("input_norm", 0),
        "post_attention_layernorm": ("post_norm", 0),
    }
    if proj not in offsets:
        raise KeyError(name)
    target, offset = offsets[proj]
    return [(f"layers.{i}.{target}.{kind}", offset, tensor)]
