"""Which language-model family a checkpoint holds, read from its text config; the families batchvl runs natively.

Each family is a module (qwen2.py, qwen3.py, ...) with `spec_from_config` and `map_weight`. A checkpoint's
`architectures` decide first (OpenGVLab's `llm_config` names them), then its `model_type` (transformers-native
text configs carry only that). Anything else is refused with one line naming it; mixture-of-experts language
models (InternVL3.5-30B-A3B and -241B-A28B's Qwen3-MoE, InternVL3.5-GPT-OSS-20B-A4B's GPT-OSS) say so.
"""

from __future__ import annotations

from types import ModuleType

from batchvl.errors import CheckpointError
from batchvl.models import internlm2, llama, phi3, qwen2, qwen3
from batchvl.models.checkpoint import LAYOUT_HF, CheckpointInfo

FAMILIES: dict[str, ModuleType] = {"qwen2": qwen2, "qwen3": qwen3, "internlm2": internlm2, "llama": llama,
                                   "phi3": phi3}
_ARCH_TO_FAMILY = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "InternLM2ForCausalLM": "internlm2",
    "LlamaForCausalLM": "llama",
    "Phi3ForCausalLM": "phi3",
}
# Mixture-of-experts language models of InternVL checkpoints, by architecture and by model_type.
_MOE = {"Qwen3MoeForCausalLM", "qwen3_moe", "GptOssForCausalLM", "gpt_oss"}


def _architectures(cfg: dict) -> list[str]:
    archs = cfg.get("architectures") or []
    return [str(a) for a in archs] if isinstance(archs, list) else [str(archs)]


def _names(cfg: dict, model_type: object) -> list[str]:
    """What a text config calls its model: its architectures, then its model_type (for messages and the MoE test)."""
    return [*_architectures(cfg), *([str(model_type)] if model_type else [])]


def moe_architecture(ck: CheckpointInfo) -> str | None:
    """The name of the checkpoint's language model when it is a mixture-of-experts one (InternVL3.5's Qwen3-MoE and
    GPT-OSS), else None. batchvl runs these on neither backend (issue 20)."""
    names = _names(ck.text_config, ck.text_config.get("model_type"))
    return " / ".join(names) if _MOE & set(names) else None


def text_family(ck: CheckpointInfo) -> str:
    """The family name (a key of FAMILIES) of the checkpoint's language model. Raises CheckpointError (`model:
    language model X is not supported natively ...`) for any other."""
    cfg = ck.text_config
    for arch in _architectures(cfg):
        if arch in _ARCH_TO_FAMILY:
            return _ARCH_TO_FAMILY[arch]
    model_type = cfg.get("model_type", "qwen2" if ck.layout == LAYOUT_HF else None)
    names = _names(cfg, model_type)
    moe = bool(_MOE & set(names))
    if model_type in FAMILIES and not moe:
        return model_type
    name = " / ".join(names) if names else "(no architectures, no model_type)"
    moe = " (a mixture-of-experts model, which batchvl does not run)" if moe else ""
    raise CheckpointError(f"language model {name} is not supported natively{moe}; supported: "
                          f"{', '.join(_ARCH_TO_FAMILY)}")
