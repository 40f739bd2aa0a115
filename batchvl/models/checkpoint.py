"""Finding a checkpoint and reading what the rest of batchvl needs from its configs.

Two layouts exist: transformers-native (`model_type: internvl`, weights `model.vision_tower.*`, ...) and
OpenGVLab's (`architectures: ["InternVLChatModel"]`, `llm_config`/`vision_config`, weights
`vision_model.*`, `mlp1.*`, `language_model.*`). Both describe the same numbers; `CheckpointInfo` holds them
in one shape.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from batchvl.config.spec import path_is, shown
from batchvl.errors import JobError
from batchvl.models.compressed import Fp8Checkpoint, read_quantization

LAYOUT_HF = "hf"
LAYOUT_OPENGVLAB = "opengvlab"

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(model: str, base_dir: str | os.PathLike = ".") -> Path:
    """A local checkpoint directory, or a hub name found in the local Hugging Face cache (never downloads)."""
    path = Path(os.path.expanduser(model))
    local = path if path.is_absolute() else Path(base_dir) / path
    name = shown(model, quote=False)
    if path_is(local, "is_dir"):
        if not (local / "config.json").is_file():
            raise JobError(f"model: {name} is a directory but has no config.json")
        return local.resolve()
    if _HUB_NAME.match(model) and not model.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(model, local_files_only=True))
        except LocalEntryNotFoundError:
            raise JobError(f"model: {name} is not a local directory and not in the local Hugging Face cache "
                           "(batchvl never downloads; fetch it first with `hf download`)") from None
    raise JobError(f"model: no such checkpoint directory: {name}")


@dataclass(frozen=True)
class CheckpointInfo:
    """The numbers batchvl needs from a checkpoint's configs, whatever its layout."""

    path: Path
    layout: str
    config: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> CheckpointInfo:
        """The checkpoint's configs, read and checked. Raises JobError (`model: ...`) on a config that is not
        JSON, not an InternVL one, or holds a number batchvl cannot use."""
        config = read_json(path / "config.json")
        archs = config.get("architectures") or []
        if not isinstance(archs, list):
            archs = []
        if config.get("model_type") == "internvl":
            layout = LAYOUT_HF
        elif "InternVLChatModel" in archs or config.get("model_type") == "internvl_chat":
            layout = LAYOUT_OPENGVLAB
        else:
            found = shown(config.get("model_type") or archs, quote=False)
            raise JobError(f"model: {path} is not an InternVL checkpoint (model_type/architectures: {found})")
        info = cls(path=path, layout=layout, config=config)
        info._check()
        return info

    def _check(self) -> None:
        """Each number the rest of batchvl reads from the configs, read once, so that a garbage value (a
        string, a list, zero) is one JobError here rather than a traceback in the middle of a run."""
        text_key = "text_config" if self.layout == LAYOUT_HF else "llm_config"
        for key in ("vision_config", text_key):
            if not isinstance(self.config.get(key) or {}, dict):
                raise JobError(f"model: {self.path / 'config.json'}: {key} is not a mapping")
        if not isinstance(self.template_name or "", str):
            raise JobError(f"model: {self.path / 'config.json'}: template is not a string")
        names = ("tile_size", "patch_size", "tokens_per_tile", "min_dynamic_patch", "max_dynamic_patch",
                 "max_positions")
        try:
            values = {name: getattr(self, name) for name in names}
            _ = self.downsample_ratio, self.use_thumbnail
        except JobError:  # preprocessor_config.json, already named
            raise
        except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError) as e:
            raise JobError(f"model: {self.path} has a config value batchvl cannot read "
                           f"({type(e).__name__}: {shown(str(e), quote=False)})") from None
        for name, value in values.items():
            if value < (2 if name == "max_positions" else 1):
                raise JobError(f"model: {self.path}: its {name} is {value}, which no model has")

    @property
    def vision_config(self) -> dict[str, Any]:
        return self.config.get("vision_config") or {}

    @property
    def text_config(self) -> dict[str, Any]:
        key = "text_config" if self.layout == LAYOUT_HF else "llm_config"
        return self.config.get(key) or {}

    @cached_property
    def _preprocessor(self) -> dict[str, Any]:
        file = self.path / "preprocessor_config.json"
        return read_json(file) if file.is_file() else {}

    @property
    def tile_size(self) -> int:
        if self.layout == LAYOUT_OPENGVLAB and self.config.get("force_image_size"):
            return int(self.config["force_image_size"])
        return _first(self.vision_config.get("image_size", 448))

    @property
    def patch_size(self) -> int:
        return _first(self.vision_config.get("patch_size", 14))

    @property
    def downsample_ratio(self) -> float:
        return float(self.config.get("downsample_ratio", 0.5))

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens each tile becomes after the pixel shuffle: (S/patch)^2 * ratio^2 (256 for InternVL)."""
        side = self.tile_size // self.patch_size
        return int(round(side * side * self.downsample_ratio ** 2))

    @property
    def dynamic_tiling(self) -> bool:
        """Whether images are cut into tiles. An OpenGVLab config says so in `dynamic_image_size`, which
        InternVLChatConfig defaults to False: InternVL 1 (Chat-V1-1, V1-2, V1-2-Plus) leaves it off and feeds one
        tile_size x tile_size resize of each image, whatever its min/max_dynamic_patch hold."""
        return self.layout != LAYOUT_OPENGVLAB or bool(self.config.get("dynamic_image_size", False))

    @property
    def min_dynamic_patch(self) -> int:
        if self.layout == LAYOUT_OPENGVLAB:
            return int(self.config.get("min_dynamic_patch", 1)) if self.dynamic_tiling else 1
        return int(self._preprocessor.get("min_patches", 1))

    @property
    def max_dynamic_patch(self) -> int:
        if self.layout == LAYOUT_OPENGVLAB:
            return int(self.config.get("max_dynamic_patch", 12)) if self.dynamic_tiling else 1
        return int(self._preprocessor.get("max_patches", 12))

    @property
    def use_thumbnail(self) -> bool:
        if self.layout == LAYOUT_OPENGVLAB:
            return bool(self.config.get("use_thumbnail", True)) and self.dynamic_tiling
        return bool(self._preprocessor.get("crop_to_patches", True))

    @property
    def max_positions(self) -> int:
        """The longest sequence (prompt + output) the language model accepts."""
        return int(self.text_config.get("max_position_embeddings", 32768))

    @cached_property
    def quantization(self) -> Fp8Checkpoint | None:
        """The weights' fp8 layout when config.json says they are quantized (compressed-tensors FP8_DYNAMIC), else
        None. Raises JobError (`model: ...`) for a quantization the native engine does not load; read only by the
        native backend's checks and loader (the transformers backend reads quantization_config itself)."""
        return read_quantization(self.config, self.path / "config.json")

    @property
    def template_name(self) -> str | None:
        """OpenGVLab's conversation template name (`template` key), if any."""
        return self.config.get("template")


def read_json(file: Path) -> dict[str, Any]:
    """One of a checkpoint's JSON files, as the mapping it must hold. Raises JobError (`model: ...`) when it
    cannot be read, is not JSON or holds something else."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"model: cannot read {file}: {shown(str(e), quote=False)}") from None
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise JobError(f"model: {file} is not valid JSON ({shown(str(e), quote=False)})") from None
    if not isinstance(value, dict):
        raise JobError(f"model: {file}: expected a JSON object, got {type(value).__name__}")
    return value


def _tokenizer_class(path: Path) -> Any:
    """AutoTokenizer, or the class it would pick when tokenizer_config.json names one of transformers' generic
    tokenizers-backed classes (GENERIC_TOKENIZERS) and no remote code: AutoTokenizer would take that very class
    by name, and importing AutoTokenizer imports most of transformers (1.6 s of CPU in every process that loads a
    tokenizer, engine workers included). Model-specific class names (Qwen2Tokenizer, LlamaTokenizer, ...) go
    through AutoTokenizer, whose choice among a family's classes is its own."""
    import transformers

    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return transformers.AutoTokenizer
    if not isinstance(config, dict) or "auto_map" in config or config.get("tokenizer_class") not in GENERIC_TOKENIZERS:
        return transformers.AutoTokenizer
    return getattr(transformers, config["tokenizer_class"])


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _first(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer, from its own files only."""
    try:
        return _tokenizer_class(path).from_pretrained(path, trust_remote_code=trust_remote_code,
                                                      local_files_only=True)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise JobError("engine.trust_remote_code: the checkpoint's tokenizer needs its own code; "
                           "set engine.trust_remote_code: true to allow it") from None
        raise JobError(f"model: cannot load the tokenizer from {path}: {shown(str(e), quote=False)}") from None
    except Exception as e:  # whatever a broken tokenizer file raises, the fault is the checkpoint's
        raise JobError(f"model: cannot load the tokenizer from {path}: {shown(str(e), quote=False)}") from None


def checkpoint_chat_template(path: Path, tokenizer: Any) -> str | None:
    """The checkpoint's own chat template: the tokenizer's, else the processor's file, else None."""
    if getattr(tokenizer, "chat_template", None):
        template = tokenizer.chat_template
        return template if isinstance(template, str) else template.get("default")
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = path / "chat_template.json"
    if as_json.is_file():
        template = read_json(as_json).get("chat_template")
        if template is not None and not isinstance(template, str):
            raise JobError(f"model: {as_json}: chat_template is not a string")
        return template
    return None


def stop_token_ids(path: Path, tokenizer: Any) -> list[int]:
    """EOS ids from the tokenizer and the generation config, in that order, without repeats."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = read_json(gen).get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos]:
            if i is not None and (isinstance(i, bool) or not isinstance(i, int)):
                raise JobError(f"model: {gen}: eos_token_id {shown(i)} is not a token id")
            if i is not None and i not in ids:
                ids.append(i)
    return ids
