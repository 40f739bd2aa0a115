"""Rotary position embeddings for the language models InternVL is built on, bit-exact with transformers 5.17.

Families and what their checkpoints use:

* Qwen2 / Qwen2.5 (InternVL2.5, InternVL3 small sizes): ``default``.
* InternLM2 / 2.5 (InternVL2-2B/8B/26B, InternVL2.5-*): ``default``, or ``rope_scaling: {type: dynamic|linear,
  factor}`` in the OpenGVLab ``llm_config``. Those checkpoints run OpenGVLab's own ``modeling_internlm2.py``
  whose numerics differ from transformers' in two places, reproduced here under ``convention="internlm2"``
  (set by :meth:`RopeSpec.from_hf_config` for ``model_type: internlm2``):

  - ``linear`` divides the *positions* by the factor (``t = arange(n).float() / factor``) instead of dividing
    the inverse frequencies, which rounds differently;
  - ``dynamic`` (NTK) changes nothing up to ``max_position_embeddings``; past it the base is recomputed in
    Python float64 from the current total length (``kv_seq_len``) as
    ``theta * (factor * seq_len / max_pos - (factor - 1)) ** (dim / (dim - 2))``.

* Llama (InternVL2-40B/76B's Nous-Hermes-2-Yi / Llama-3 LLMs): ``default``, ``linear``, ``llama3``.
* Phi-3 (InternVL2-4B, Phi-3-mini-128k): ``longrope`` (formerly ``su``; Phi3Config also renames ``yarn``).

The numbers are produced the way transformers produces them: inverse frequencies in float32 from an int64
``arange`` converted to float, ``theta ** (arange / dim)`` taken with ``theta`` a Python scalar, frequencies as
the plain float32 product position x inverse frequency, ``emb = cat(freqs, freqs)``, and
``cos = emb.cos() * attention_scaling`` (likewise sin) computed in float32 and only then cast. The
"construction-time" inverse frequencies are computed on the CPU (where transformers computes them at model
init, then moves the buffer); the ones transformers recomputes inside ``forward`` (longrope's long factors,
dynamic NTK past ``max_position_embeddings``) are computed on the target device, as transformers does.

``seq_len_hint`` is the ``seq_len`` transformers' rotary module derives in a forward pass: ``max(position_ids)
+ 1`` over the *whole batch*. ``None`` gives the tables the module holds right after construction. Only
``longrope`` and ``dynamic`` depend on it (:attr:`RopeSpec.seq_len_dependent`):

* ``longrope``: short factors when ``seq_len <= original_max_position_embeddings`` (or ``None``), long factors
  when it is larger. The attention scaling is the same for both: ``attention_factor`` if given, else
  ``sqrt(1 + ln(factor) / ln(original_max))`` with ``factor`` = the given ``factor`` or
  ``max_position_embeddings / original_max_position_embeddings`` (1.0 when ``factor <= 1``).
* ``dynamic`` (transformers' convention): up to ``max_position_embeddings`` (or ``None``) the construction-time
  frequencies, which equal ``default`` (the NTK base evaluates to ``theta * 1.0``). Past it the NTK base is
  recomputed from ``seq_len``, as transformers does in ``forward``: with ``seq_len`` an int64 tensor, so the
  base arithmetic is float32. transformers keeps the grown frequencies for later calls until a call comes in
  below the original length; such cross-call state is the caller's business (pass the hint it would see).

Because a KV cache keeps keys rotated with whatever frequencies were current when they were written, exact
parity past the switching points needs tables per forward step; for sequences that stay within
``original_max_position_embeddings`` (longrope) or ``max_position_embeddings`` (dynamic) one static table is
exact for every position. In transformers 5.17 generation, longrope decides per forward call: the prefill
uses ``max(prompt positions) + 1``, each decode step ``max(step positions) + 1`` (batch-wide), so the step
whose largest position reaches ``original_max_position_embeddings`` switches to the long factors while the
cached keys keep the short ones. (``Phi3ForCausalLM.prepare_inputs_for_generation`` tries to drop the cache at
that point to re-prefill with long factors, but in 5.17 it still feeds only the newest token, so its output
past the switch has no context; ``InternVLForConditionalGeneration`` has no such hook.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("default", "linear", "dynamic", "llama3", "longrope")
CONVENTIONS = ("transformers", "internlm2")

# Phi3Config declares `original_max_position_embeddings` as a field with this default, and its value takes
# priority over the one inside `rope_scaling` when the type is already `longrope`.
_PHI3_ORIGINAL_MAX_DEFAULT = 4096
_DEFAULT_THETA = 10000.0


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class RopeSpec:
    """What is needed to build rotary tables. ``extra`` holds the kind's scaling parameters as sorted pairs:

    * ``linear``: none besides ``factor`` (and ``convention``).
    * ``dynamic``: ``max_position_embeddings``; ``convention`` (``transformers`` or ``internlm2``).
    * ``llama3``: ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``.
    * ``longrope``: ``short_factor``, ``long_factor`` (``rotary_dim // 2`` numbers each),
      ``original_max_position_embeddings``, optional ``attention_factor``; ``factor`` is the scale used for
      the default attention factor (``max_position_embeddings / original_max_position_embeddings`` when the
      config gives none).
    """

    head_dim: int
    theta: float
    kind: str = "default"  # default | linear | dynamic | llama3 | longrope
    factor: float = 1.0
    partial_rotary_factor: float = 1.0
    extra: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unsupported rope kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        frozen = tuple(sorted((str(k), _freeze(v)) for k, v in dict(self.extra).items()))
        object.__setattr__(self, "extra", frozen)
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary dim must be a positive even number, got {self.rotary_dim}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown rope convention {self.convention!r}")
        needed = {
            "dynamic": ("max_position_embeddings",),
            "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
        }.get(self.kind, ())
        missing = [name for name in needed if self.param(name) is None]
        if missing:
            raise ValueError(f"rope kind {self.kind!r} needs {', '.join(missing)} in extra")
        if self.kind == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(self.param(name)) != self.rotary_dim // 2:
                    raise ValueError(f"{name} has {len(self.param(name))} entries, expected {self.rotary_dim // 2}")

    def param(self, name: str, default: Any = None) -> Any:
        for key, value in self.extra:
            if key == name:
                return value
        return default

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that are rotated (``int(head_dim * partial_rotary_factor)``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def convention(self) -> str:
        return self.param("convention", "transformers")

    @property
    def seq_len_dependent(self) -> bool:
        """Whether the tables depend on ``seq_len_hint`` (longrope's short/long switch, dynamic NTK)."""
        return self.kind in ("longrope", "dynamic")

    @property
    def switch_length(self) -> int | None:
        """The largest ``seq_len`` for which the construction-time tables are used, for seq-dependent kinds."""
        if self.kind == "longrope":
            return int(self.param("original_max_position_embeddings"))
        if self.kind == "dynamic":
            return int(self.param("max_position_embeddings"))
        return None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> RopeSpec:
        """Read a text-model config dict (``config.json`` of transformers 5, or an older one).

        Accepts ``rope_parameters`` ({rope_type, rope_theta, ...}) or the older ``rope_theta`` + ``rope_scaling``
        ({type|rope_type, factor, ...}); ``rope_scaling`` wins when both are set, as in transformers. A whole
        InternVL config is accepted too: its ``text_config`` / ``llm_config`` is read.
        """
        if "num_attention_heads" not in cfg and "head_dim" not in cfg:
            for key in ("text_config", "llm_config"):
                if isinstance(cfg.get(key), dict):
                    return cls.from_hf_config(cfg[key])
            raise ValueError("config has neither head_dim nor num_attention_heads (nor a text_config/llm_config)")

        params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
        if params and all(isinstance(v, dict) or v is None for v in params.values()):
            raise NotImplementedError("per-layer-type rope_parameters are not supported")
        model_type = str(cfg.get("model_type") or "")
        architectures = cfg.get("architectures") or []
        is_internlm2 = model_type == "internlm2" or any("InternLM2" in str(a) for a in architectures)

        raw_kind = params.get("rope_type", params.get("type")) or "default"
        kind = raw_kind
        if kind == "su" or (kind == "yarn" and model_type == "phi3"):
            kind = "longrope"  # Phi3Config's backward compatibility
        if kind not in KINDS:
            raise NotImplementedError(f"rope type {raw_kind!r} is not supported")

        theta = params.get("rope_theta", cfg.get("rope_theta", _DEFAULT_THETA))
        if theta is None:
            theta = _DEFAULT_THETA
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor")) or 1.0
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        max_pos = cfg.get("max_position_embeddings")

        extra: dict[str, Any] = {}
        factor = params.get("factor")
        if kind in ("linear", "dynamic"):
            if factor is None:
                raise ValueError(f"rope type {raw_kind!r} needs a factor")
            if is_internlm2:
                extra["convention"] = "internlm2"
            if kind == "dynamic":
                extra["max_position_embeddings"] = max_pos
        elif kind in ("llama3", "longrope"):
            inner = params.get("original_max_position_embeddings")
            if model_type == "phi3":
                top = cfg.get("original_max_position_embeddings", _PHI3_ORIGINAL_MAX_DEFAULT)
                original = top if raw_kind == "longrope" or inner is None else inner
            else:
                original = inner if inner is not None else max_pos
            extra["original_max_position_embeddings"] = original
            if kind == "llama3":
                extra["low_freq_factor"] = params["low_freq_factor"]
                extra["high_freq_factor"] = params["high_freq_factor"]
            else:
                extra["short_factor"] = params["short_factor"]
                extra["long_factor"] = params["long_factor"]
                extra["max_position_embeddings"] = max_pos
                if params.get("attention_factor") is not None:
                    extra["attention_factor"] = params["attention_factor"]
                if factor is None:
                    factor = max_pos / original
        if factor is None:
            factor = 1.0
        return cls(head_dim=int(head_dim), theta=theta, kind=kind, factor=factor,
                   partial_rotary_factor=partial, extra=tuple(extra.items()))


def _exponents(dim: int, device) -> torch.Tensor:
    """``arange(0, dim, 2) / dim`` as transformers builds it: int64 arange, converted to float32, then divided."""
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(dtype=torch.float32) / dim


def _longrope_attention_scaling(spec: RopeSpec) -> float:
    given = spec.param("attention_factor")
    if given is not None:
        return given
    if spec.factor <= 1.0:
        return 1.0
    original = spec.param("original_max_position_embeddings")
    return math.sqrt(1 + math.log(spec.factor) / math.log(original))


def rope_inv_freq(spec: RopeSpec, device=None, seq_len_hint: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, ``rotary_dim // 2`` entries, on ``device``) and the attention scaling."""
    dim = spec.rotary_dim
    cpu = torch.device("cpu")
    theta = spec.theta
    kind = spec.kind

    if kind == "longrope":
        scaling = _longrope_attention_scaling(spec)
        long = seq_len_hint is not None and seq_len_hint > spec.param("original_max_position_embeddings")
        # transformers computes the short (construction-time) ones on the CPU, the long ones in forward on
        # the input's device.
        where = device if long else cpu
        ext = torch.tensor(list(spec.param("long_factor" if long else "short_factor")), dtype=torch.float32,
                           device=where)
        inv_freq = 1.0 / (ext * theta ** _exponents(dim, where))
        return inv_freq.to(device), scaling

    if kind == "dynamic":
        max_pos = spec.param("max_position_embeddings")
        grown = seq_len_hint is not None and seq_len_hint > max_pos
        if spec.convention == "internlm2":
            if not grown:
                base, where = theta, cpu
            else:  # Python float64 arithmetic on the int kv length, as modeling_internlm2.py does
                base = theta * ((spec.factor * seq_len_hint / max_pos) - (spec.factor - 1)) ** (dim / (dim - 2))
                where = device
        elif not grown:  # transformers' construction: seq_len defaults to max_position_embeddings (Python math)
            base = theta * ((spec.factor * max_pos / max_pos) - (spec.factor - 1)) ** (dim / (dim - 2))
            where = cpu
        else:  # transformers' forward: seq_len = max(position_ids) + 1 is an int64 tensor -> float32 arithmetic
            where = device
            seq = torch.tensor(seq_len_hint, dtype=torch.int64, device=where)
            base = theta * ((spec.factor * seq / max_pos) - (spec.factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** _exponents(dim, where))
        return inv_freq.to(device), 1.0

    inv_freq = 1.0 / (theta ** _exponents(dim, cpu))
    if kind == "linear" and spec.convention != "internlm2":
        inv_freq = inv_freq / spec.factor
    elif kind == "llama3":
        inv_freq = _llama3_adjust(inv_freq, spec)
    return inv_freq.to(device), 1.0


def _llama3_adjust(inv_freq: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling, evaluated in the same order as transformers (float32)."""
    factor = spec.factor
    low = spec.param("low_freq_factor")
    high = spec.param("high_freq_factor")
    context = spec.param("original_max_position_embeddings")
    long_wavelen_limit = context / low  # wavelengths above this are divided by `factor`
    short_wavelen_limit = context / high  # wavelengths below this are kept

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > long_wavelen_limit, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = (wavelen >= short_wavelen_limit) & (wavelen <= long_wavelen_limit)
    return torch.where(in_between, blended, scaled)


def rope_tables(spec: RopeSpec, max_positions: int, device, dtype=torch.float32,
                seq_len_hint: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_positions, rotary_dim] (already multiplied by the attention scaling, as transformers
    does), computed in float32 then cast to dtype."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    inv_freq, scaling = rope_inv_freq(spec, device=device, seq_len_hint=seq_len_hint)
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).to(dtype=torch.float32)
    if spec.kind == "linear" and spec.convention == "internlm2":
        positions = positions / spec.factor
    freqs = positions[:, None] * inv_freq[None, :]  # one float32 multiply per entry, as transformers' K=1 matmul
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * scaling
    sin = emb.sin() * scaling
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return (x * cos) + (_rotate_half(x) * sin)
    head, tail = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat(((head * cos) + (_rotate_half(head) * sin), tail), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, S, D], k [B, Hk, S, D]; cos/sin [B, S, rotary_dim] (gathered at each row's positions); the
    rotate-half convention transformers' Llama/Qwen2 use; partial rotary applies to the first rotary_dim dims.

    Pass cos/sin already cast to q's dtype, as transformers does, to get its low-precision arithmetic.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
