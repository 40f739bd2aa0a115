"""InternLM2 / InternLM2.5 (InternVL 1.5, InternVL2-2B/8B/26B language models): config and weights.

InternLM2 is Llama-shaped, spelled differently: `tok_embeddings`, `attention.wqkv` / `attention.wo`,
`feed_forward.w1` (gate) / `w3` (up) / `w2` (down), `attention_norm`, `ffn_norm` and `output`. Its fused
`wqkv` is grouped per KV head: for each of the Hkv groups, its q heads, then its k head, then its v head,
so it is regrouped into our [all q | all k | all v] layout on load.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from batchvl.models.decoder import DecoderSpec
from batchvl.models.rope import RopeSpec

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_NAMES = {
    "attention.wo": ("o", 0),
    "feed_forward.w1": ("gate_up", 0),
    "feed_forward.w2": ("down", 0),
    "attention_norm": ("input_norm", 0),
    "ffn_norm": ("post_norm", 0),
}


def spec_from_config(cfg: dict[str, Any]) -> DecoderSpec:
    bias = bool(cfg.get("bias", False))
    heads = int(cfg["num_attention_heads"])
    return DecoderSpec(
        family="internlm2",
        vocab=int(cfg["vocab_size"]),
        hidden=int(cfg["hidden_size"]),
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg["hidden_size"]) // heads,
        intermediate=int(cfg["intermediate_size"]),
        eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=RopeSpec.from_hf_config(cfg),
        max_positions=int(cfg.get("max_position_embeddings", 32768)),
        qkv_bias=bias,
        o_bias=bias,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def split_wqkv(w: torch.Tensor, s: DecoderSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped [Hkv * (q_per_kv + 2) * D, ...] -> q [H*D, ...], k [Hkv*D, ...], v [Hkv*D, ...]."""
    per = s.heads // s.kv_heads
    g = w.reshape(s.kv_heads, per + 2, s.head_dim, *w.shape[1:])
    q = g[:, :per].reshape(s.q_width, *w.shape[1:])
    k = g[:, per].reshape(s.kv_width, *w.shape[1:])
    v = g[:, per + 1].reshape(s.kv_width, *w.shape[1:])
    return q, k, v


def map_weight(name: str, tensor: torch.Tensor, s: DecoderSpec) -> list[tuple[str, int, torch.Tensor]]:
    if name == "tok_embeddings.weight":
        return [("embed.weight", 0, tensor)]
    if name == "norm.weight":
        return [("norm.weight", 0, tensor)]
    if name == "output.weight":
        return [("lm_head.weight", 0, tensor)]
    m = _LAYER.match(name)
    if not m:
        raise KeyError(name)
    i = m.group(1)
    proj, _, kind = m.group(2).rpartition(".")
    if proj == "attention.wqkv":
        q, k, v = split_wqkv(tensor, s)
        target = f"layers.{i}.qkv.{kind}"
        return [(target, 0, q), (target, s.q_width, k), (target, s.q_width + s.kv_width, v)]
    if proj == "feed_forward.w3":
        return [(f"layers.{i}.gate_up.{kind}", s.intermediate, tensor)]
    if proj not in _NAMES:
        raise KeyError(name)
    target, offset = _NAMES[proj]
    return [(f"layers.{i}.{target}.{kind}", offset, tensor)]
