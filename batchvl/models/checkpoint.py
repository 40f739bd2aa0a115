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
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        archs = config.get("architectures") or []
        if config.get("model_type") == "internvl":
            layout = LAYOUT_HF
        elif "InternVLChatModel" in archs or config.get("model_type") == "internvl_chat":
            layout = LAYOUT_OPENGVLAB
        else:
            found = config.get("model_type") or archs
            raise JobError(f"model: {path} is not an InternVL checkpoint (model_type/architectures: {found})")
        return cls(path=path, layout=layout, config=config)

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
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}

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
    def min_dynamic_patch(self) -> int:
        if self.layout == LAYOUT_OPENGVLAB:
            return int(self.config.get("min_dynamic_patch", 1))
        return int(self._preprocessor.get("min_patches", 1))

    @property
    def max_dynamic_patch(self) -> int:
        if self.layout == LAYOUT_OPENGVLAB:
            return int(self.config.get("max_dynamic_patch", 12))
        return int(self._preprocessor.get("max_patches", 12))

    @property
    def use_thumbnail(self) -> bool:
        if self.layout == LAYOUT_OPENGVLAB:
            return bool(self.config.get("use_thumbnail", True))
        return bool(self._preprocessor.get("crop_to_patches", True))

    @property
    def max_positions(self) -> int:
        """The longest sequence (prompt + output) the language model accepts."""
        return int(self.text_config.get("max_position_embeddings", 32768))

    @property
    def template_name(self) -> str | None:
        """OpenGVLab's conversation template name (`template` key), if any."""
        return self.config.get("template")


def _first(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer, from its own files only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise JobError("engine.trust_remote_code: the checkpoint's tokenizer needs its own code; "
                           "set engine.trust_remote_code: true to allow it") from None
        raise JobError(f"model: cannot load the tokenizer from {path}: {e}") from None
    except OSError as e:
        raise JobError(f"model: cannot load the tokenizer from {path}: {e}") from None


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
        return json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
    return None


def stop_token_ids(path: Path, tokenizer: Any) -> list[int]:
    """EOS ids from the tokenizer and the generation config, in that order, without repeats."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids
