"""batchvl.models.rope against transformers' own rotary embedding classes: bit-exact in float32 (CPU)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import LlamaConfig, Phi3Config, Qwen2Config
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen2 import modeling_qwen2

from batchvl.models.rope import RopeSpec, apply_rope, rope_inv_freq, rope_tables

# Phi-3-mini-128k shapes: hidden 3072, 32 heads -> head_dim 96 -> 48 factors. Plausible values, not the real ones.
SHORT_FACTOR = [1.0 + 0.01 * i for i in range(48)]
LONG_FACTOR = [1.0 + 1.5 * i for i in range(48)]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 units in the last place (0 = bit-identical)."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    ia = a.contiguous().view(torch.int32).to(torch.int64)
    ib = b.contiguous().view(torch.int32).to(torch.int64)
    # map the sign-magnitude float bit patterns to a monotonic integer line
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def hf_cos_sin(rotary_cls, config, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    module = rotary_cls(config)  # a fresh module: longrope/dynamic state lives in it
    x = torch.zeros(1, dtype=torch.float32)
    return module(x, position_ids)


def check_against_hf(spec: RopeSpec, rotary_cls, config, position_ids: torch.Tensor, ulp: int = 0) -> None:
    """Tables built for this forward's seq_len, gathered at the positions, vs the transformers module.

    Bit-identical on CPU today; `ulp` is there should a torch build round cos/sin differently per shape.
    """
    seq_len = int(position_ids.max()) + 1
    cos_ref, sin_ref = hf_cos_sin(rotary_cls, config, position_ids)
    cos_t, sin_t = rope_tables(spec, seq_len, "cpu", seq_len_hint=seq_len)
    cos, sin = cos_t[position_ids], sin_t[position_ids]
    assert cos.shape == cos_ref.shape == (position_ids.shape[0], position_ids.shape[1], spec.rotary_dim)
    assert max_ulp(cos, cos_ref) <= ulp and max_ulp(sin, sin_ref) <= ulp


def positions(batch: int, seq: int, high: int, low: int = 0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (batch, seq), generator=g)
    ids[0, 0] = high - 1  # make the forward's seq_len exactly `high`
    return ids


def llama_config(**kw) -> LlamaConfig:
    base = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=1,
                intermediate_size=64, vocab_size=32)
    return LlamaConfig(**{**base, **kw})


def phi3_config(**kw) -> Phi3Config:
    base = dict(hidden_size=3072, num_attention_heads=32, num_hidden_layers=1, intermediate_size=64, vocab_size=32,
                max_position_embeddings=131072, original_max_position_embeddings=4096,
                rope_scaling={"type": "longrope", "short_factor": SHORT_FACTOR, "long_factor": LONG_FACTOR})
    return Phi3Config(**{**base, **kw})


def test_qwen2_default_matches_transformers():
    cfg = Qwen2Config(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=1,
                      intermediate_size=64, vocab_size=32, rope_theta=1000000.0, max_position_embeddings=32768)
    spec = RopeSpec.from_hf_config(cfg.to_dict())
    assert (spec.kind, spec.head_dim, spec.theta, spec.rotary_dim) == ("default", 64, 1000000.0, 64)
    check_against_hf(spec, modeling_qwen2.Qwen2RotaryEmbedding, cfg, positions(2, 257, 40000))
    inv_freq, scaling = rope_inv_freq(spec)
    assert torch.equal(inv_freq, modeling_qwen2.Qwen2RotaryEmbedding(cfg).inv_freq) and scaling == 1.0


@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_llama_kinds_match_transformers(rope):
    cfg = llama_config(max_position_embeddings=131072, rope_parameters={**rope, "rope_theta": 500000.0})
    spec = RopeSpec.from_hf_config(cfg.to_dict())
    assert spec.kind == rope["rope_type"] and spec.head_dim == 128
    module = modeling_llama.LlamaRotaryEmbedding(cfg)
    assert torch.equal(rope_inv_freq(spec)[0], module.inv_freq)
    check_against_hf(spec, modeling_llama.LlamaRotaryEmbedding, cfg, positions(2, 300, 20000))


def test_llama3_from_old_style_rope_scaling():
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 131072,
           "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    spec = RopeSpec.from_hf_config(cfg)
    assert spec.param("original_max_position_embeddings") == 8192 and spec.factor == 8.0
    ref = modeling_llama.LlamaRotaryEmbedding(LlamaConfig.from_dict(cfg)).inv_freq
    inv_freq = rope_inv_freq(spec)[0]
    assert torch.equal(inv_freq, ref)
    # all three llama3 regions are exercised: kept, blended and divided frequencies
    plain = rope_inv_freq(RopeSpec(head_dim=128, theta=500000.0))[0]
    ratio = plain / inv_freq
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


@pytest.mark.parametrize("high", [2000, 4096, 4097, 9000])
def test_phi3_longrope_short_and_long(high):
    cfg = phi3_config()
    spec = RopeSpec.from_hf_config(cfg.to_dict())
    assert spec.kind == "longrope" and spec.rotary_dim == 96
    assert spec.param("original_max_position_embeddings") == 4096 and spec.factor == 32.0
    check_against_hf(spec, modeling_phi3.Phi3RotaryEmbedding, cfg, positions(2, 200, high))
    # the switch is on seq_len = max(position_ids) + 1 > original_max_position_embeddings
    short = rope_inv_freq(spec, seq_len_hint=None)[0]
    assert torch.equal(rope_inv_freq(spec, seq_len_hint=high)[0], short) == (high <= 4096)


def test_phi3_longrope_attention_scaling_applies_to_short_factors_too():
    spec = RopeSpec.from_hf_config(phi3_config().to_dict())
    expected = math.sqrt(1 + math.log(32) / math.log(4096))
    assert rope_inv_freq(spec)[1] == rope_inv_freq(spec, seq_len_hint=5000)[1] == expected
    cos, sin = rope_tables(spec, 4, "cpu")
    assert cos[0, 0].item() == pytest.approx(expected) and sin[0, 0].item() == 0.0
    given = RopeSpec.from_hf_config(phi3_config(rope_scaling={
        "type": "longrope", "short_factor": SHORT_FACTOR, "long_factor": LONG_FACTOR, "attention_factor": 1.5,
    }).to_dict())
    assert rope_inv_freq(given)[1] == 1.5
    cfg = phi3_config(rope_scaling={"type": "longrope", "short_factor": SHORT_FACTOR, "long_factor": LONG_FACTOR,
                                    "attention_factor": 1.5})
    check_against_hf(given, modeling_phi3.Phi3RotaryEmbedding, cfg, positions(1, 50, 6000))


def test_phi3_su_config_dict_as_in_opengvlab_llm_config():
    cfg = {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32, "max_position_embeddings": 131072,
           "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
           "rope_scaling": {"type": "su", "short_factor": SHORT_FACTOR, "long_factor": LONG_FACTOR}}
    spec = RopeSpec.from_hf_config(cfg)
    assert spec == RopeSpec.from_hf_config(phi3_config().to_dict())
    assert spec.switch_length == 4096 and spec.seq_len_dependent
    assert RopeSpec.from_hf_config({"llm_config": cfg, "vision_config": {}}) == spec


def test_dynamic_matches_transformers_within_and_beyond_max():
    cfg = llama_config(hidden_size=512, num_attention_heads=8, max_position_embeddings=2048,
                       rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0})
    spec = RopeSpec.from_hf_config(cfg.to_dict())
    assert spec.kind == "dynamic" and spec.convention == "transformers" and spec.switch_length == 2048
    default = RopeSpec(head_dim=64, theta=1000000.0)
    # within max_position_embeddings: identical to default rope
    for hint in (None, 100, 2048):
        assert torch.equal(rope_inv_freq(spec, seq_len_hint=hint)[0], rope_inv_freq(default)[0])
    check_against_hf(spec, modeling_llama.LlamaRotaryEmbedding, cfg, positions(2, 100, 2048))
    # beyond: NTK base recomputed from seq_len, in float32 like transformers' forward
    for high in (2049, 5000):
        check_against_hf(spec, modeling_llama.LlamaRotaryEmbedding, cfg, positions(2, 100, high))
        assert not torch.equal(rope_inv_freq(spec, seq_len_hint=high)[0], rope_inv_freq(default)[0])


def internlm2_reference(kind: str, dim: int, base: float, max_pos: int, factor: float, seq_len: int):
    """cos/sin cache of OpenGVLab's modeling_internlm2.py rotary classes, restated."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    t = torch.arange(seq_len).to(dtype=inv_freq.dtype)
    if kind == "linear":
        t = t / factor
    if kind == "dynamic" and seq_len > max_pos:
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("kind", ["dynamic", "linear"])
def test_internlm2_conventions(kind):
    cfg = {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"], "hidden_size": 1024,
           "num_attention_heads": 16, "max_position_embeddings": 2048, "rope_theta": 1000000,
           "rope_scaling": {"type": kind, "factor": 2.0 if kind == "dynamic" else 3.0}}
    spec = RopeSpec.from_hf_config(cfg)
    assert spec.kind == kind and spec.convention == "internlm2" and spec.head_dim == 64
    factor = cfg["rope_scaling"]["factor"]
    for n in (1500, 2048, 3000):
        cos_ref, sin_ref = internlm2_reference(kind, 64, 1000000, 2048, factor, n)
        cos, sin = rope_tables(spec, n, "cpu", seq_len_hint=n)
        assert max_ulp(cos, cos_ref) == 0 and max_ulp(sin, sin_ref) == 0
    if kind == "linear":  # dividing positions rounds differently from transformers' dividing inv_freq
        hf_style = RopeSpec(head_dim=64, theta=1000000.0, kind="linear", factor=3.0)
        assert not torch.equal(rope_tables(hf_style, 2048, "cpu")[0], rope_tables(spec, 2048, "cpu")[0])
    if kind == "dynamic":  # within max_position_embeddings it is default rope
        plain = rope_tables(RopeSpec(head_dim=64, theta=1000000.0), 2048, "cpu")
        assert all(torch.equal(a, b) for a, b in zip(rope_tables(spec, 2048, "cpu"), plain, strict=True))


def test_max_ulp_helper():
    x = torch.tensor([1.0, -2.5, 0.0, 3e-3])
    up = torch.nextafter(x, torch.full_like(x, math.inf))
    assert max_ulp(x, x) == 0 and max_ulp(x, up) == 1 and max_ulp(x, torch.nextafter(up, up + 1)) == 2


def test_tables_cast_after_float32():
    spec = RopeSpec(head_dim=64, theta=10000.0)
    cos32, sin32 = rope_tables(spec, 64, "cpu")
    cos16, sin16 = rope_tables(spec, 64, "cpu", dtype=torch.bfloat16)
    assert cos16.dtype == torch.bfloat16 and torch.equal(cos16, cos32.to(torch.bfloat16))
    assert torch.equal(sin16, sin32.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_matches_llama(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 64, generator=g).to(dtype)
    k = torch.randn(2, 2, 7, 64, generator=g).to(dtype)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])  # a left-padded row
    cos_t, sin_t = rope_tables(RopeSpec(head_dim=64, theta=1000000.0), 16, "cpu", dtype=dtype)
    cos, sin = cos_t[pos], sin_t[pos]
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


def test_apply_rope_partial_rotary_matches_phi3():
    spec = RopeSpec(head_dim=64, theta=10000.0, partial_rotary_factor=0.5)
    assert spec.rotary_dim == 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 3, 5, 64, generator=g)
    k = torch.randn(1, 1, 5, 64, generator=g)
    cos_t, sin_t = rope_tables(spec, 8, "cpu")
    pos = torch.arange(5)[None]
    q_ref, k_ref = modeling_phi3.apply_rotary_pos_emb(q, k, cos_t[pos], sin_t[pos])
    q_out, k_out = apply_rope(q, k, cos_t[pos], sin_t[pos])
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert torch.equal(q_out[..., 32:], q[..., 32:])


def test_spec_validation_and_config_forms():
    with pytest.raises(ValueError):
        RopeSpec(head_dim=64, theta=1e4, kind="yarn")
    with pytest.raises(ValueError):
        RopeSpec(head_dim=64, theta=1e4, kind="longrope", extra=(("original_max_position_embeddings", 8),))
    with pytest.raises(NotImplementedError):
        RopeSpec.from_hf_config({"hidden_size": 64, "num_attention_heads": 1,
                                 "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    spec = RopeSpec.from_hf_config({"head_dim": 128, "hidden_size": 2048, "num_attention_heads": 32,
                                    "rope_parameters": {"rope_type": "default", "rope_theta": 5e6}})
    assert (spec.head_dim, spec.theta, spec.kind) == (128, 5e6, "default")
    assert RopeSpec.from_hf_config({"hidden_size": 64, "num_attention_heads": 2}).theta == 10000.0
    hash(RopeSpec.from_hf_config(phi3_config().to_dict()))  # factor lists are frozen into tuples
