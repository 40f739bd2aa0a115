"""Checkpoints already in fp8: the compressed-tensors FP8_DYNAMIC layout that llm-compressor writes.

What the layout is, and where each fact comes from (read in the sources, December 2026):
- config.json holds `quantization_config` with `quant_method: compressed-tensors`, `format`
  (`float-quantized` for fp8 weights stored as torch.float8_e4m3fn), `quantization_status: compressed`,
  `config_groups`, `ignore` and `kv_cache_scheme` (compressed-tensors
  src/compressed_tensors/quantization/quant_config.py, class QuantizationConfig; transformers
  src/transformers/utils/quantization_config.py, class CompressedTensorsConfig, passes the same keys on).
- a config group is either a scheme {targets, weights, input_activations, output_activations, format} or a list
  of targets keyed by a preset's name; FP8_DYNAMIC is weights {num_bits 8, type float, strategy channel,
  symmetric true, dynamic false} and input_activations {num_bits 8, type float, strategy token, symmetric true,
  dynamic true} (compressed-tensors quantization/quant_scheme.py, FP8_DYNAMIC and preset_name_to_scheme).
- the tensors: `<module>.weight` in float8_e4m3fn [out, in], `<module>.weight_scale` [out, 1] for the channel
  strategy (compressed-tensors quantization/lifecycle/initialize.py, initialize_qparams: expected_shape
  (rows, 1); its dtype is the dense weight's, so bf16 in most checkpoints, and is read here into float32),
  and weight ~= weight * weight_scale (compressors/quantized_compressors/naive_quantized.py:
  FloatQuantizationCompressor stores `weight` in the args' dtype and decompresses with dequantize(weight,
  scale)). Zero points are not saved for symmetric schemes (compressors/quantized_compressors/base.py,
  _skip_zp), nor is an input scale for dynamic activations (initialize_qparams returns before creating one);
  transformers' integrations/compressed_tensors.py (CompressedTensorsFP8Linear, ConvertFP8LinearScale) reads
  the same `weight` / `weight_scale` [out, 1] pair.
- `ignore` lists modules left in the dense dtype: a name, or a regex after `re:` matched with re.match
  (compressed-tensors utils/match.py, match_name). llm-compressor's recipes put the LM head and the vision
  tower there.
- vLLM takes the same scheme as W8A8 fp8 with dynamic per-token activations
  (vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py, _is_fp8_w8a8; schemes/
  compressed_tensors_w8a8_fp8.py: weight_scale per channel, minimum capability 89).

Which layers are fp8 is read from the tensors themselves (a `weight_scale` beside the weight), and checked
against `ignore`. Only this scheme is accepted: a per-tensor weight scale, static activation scales, blocks,
integers or a quantized KV cache are refused with the setting named, not guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchvl.config.spec import shown
from batchvl.errors import JobError

METHOD = "compressed-tensors"
FORMATS = ("float-quantized", "naive-quantized")  # FloatQuantizationCompressor is an alias of the naive one
SCALE_SUFFIX = ".weight_scale"
ZERO_POINT_SUFFIX = ".weight_zero_point"

# The FP8_DYNAMIC preset's arguments, as the config spells them (compressed-tensors quant_scheme.py).
FP8_DYNAMIC_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
FP8_DYNAMIC_INPUTS = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
PRESET = "FP8_DYNAMIC"


@dataclass(frozen=True)
class Fp8Checkpoint:
    """A checkpoint in the compressed-tensors FP8_DYNAMIC layout, as its config describes it."""

    ignore: tuple[str, ...]

    def ignores(self, module: str) -> bool:
        """Whether `ignore` lists this checkpoint module name (compressed-tensors' match_name)."""
        return any(re.match(e[3:], module) is not None if e.startswith("re:") else e == module for e in self.ignore)


def dense_refused(path: Path) -> JobError:
    """The error for running an fp8 checkpoint without engine.quantization: fp8. batchvl does not dequantize
    it: its weights exist only in fp8, a dense copy would take twice the memory for the same values, and the
    checkpoint was made (and evaluated) to run W8A8, not with the activations in bf16."""
    return JobError(f"engine.quantization: {path.name} holds fp8 weights (compressed-tensors {PRESET}); the native "
                    "backend runs it only with engine.quantization: fp8")


def read_quantization(config: dict[str, Any], file: Path) -> Fp8Checkpoint | None:
    """The checkpoint's fp8 layout from config.json's `quantization_config`, or None when it has none. Raises
    JobError (`model: ...`) for a quantization the native engine does not load."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    where = f"model: {file}: quantization_config"
    if not isinstance(qc, dict):
        raise JobError(f"{where} is not a mapping")
    method = qc.get("quant_method")
    if method != METHOD:
        raise JobError(f"{where}: quant_method {shown(method)} is not supported natively; batchvl loads dense "
                       "checkpoints and compressed-tensors FP8_DYNAMIC ones (llm-compressor)")
    status = qc.get("quantization_status")
    if status != "compressed":
        raise JobError(f"{where}: quantization_status is {shown(status)}; batchvl loads compressed-tensors "
                       "checkpoints saved compressed")
    if qc.get("kv_cache_scheme") is not None:
        raise JobError(f"{where}: a quantized KV cache (kv_cache_scheme) is not supported")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise JobError(f"{where}: config_groups is missing or empty")
    for name, group in groups.items():
        _check_group(name, group, qc.get("format"), where)
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(e, str) for e in ignore):
        raise JobError(f"{where}: ignore is not a list of module names")
    for entry in ignore:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                raise JobError(f"{where}: ignore entry {shown(entry)} is not a valid regex ({e})") from None
    return Fp8Checkpoint(ignore=tuple(ignore))


def _check_group(name: str, group: Any, top_format: Any, where: str) -> None:
    if isinstance(group, list):  # targets under a preset's name
        if str(name).upper() != PRESET:
            raise JobError(f"{where}: config group {shown(name)} is the preset {shown(name)}; batchvl loads "
                           f"{PRESET} only")
        return
    if not isinstance(group, dict):
        raise JobError(f"{where}: config group {shown(name)} is not a mapping")
    fmt = group.get("format") or top_format
    if fmt not in FORMATS:
        raise JobError(f"{where}: format {shown(fmt)} is not supported; batchvl loads float-quantized "
                       f"({PRESET}) weights")
    for part, wanted in (("weights", FP8_DYNAMIC_WEIGHTS), ("input_activations", FP8_DYNAMIC_INPUTS)):
        args = group.get(part)
        if not isinstance(args, dict):
            raise JobError(f"{where}: config group {shown(name)} has no {part}; batchvl loads {PRESET} "
                           "(fp8 weights and fp8 dynamic per-token activations)")
        for key, value in wanted.items():
            if args.get(key) != value:
                raise JobError(f"{where}: config group {shown(name)} {part}.{key} is {shown(args.get(key))}, "
                               f"not {value!r}; batchvl loads {PRESET} only")
    if group.get("output_activations") is not None:
        raise JobError(f"{where}: config group {shown(name)} quantizes output activations, which batchvl does "
                       "not do")
