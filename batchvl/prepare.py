"""From an input row to an engine request: prompt, media references, tiles, token ids.

Everything here is CPU work that runs on the preparation threads, ahead of the engine. Any problem with a
row (bad media, a missing prompt, too long a prompt) becomes that row's error result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchvl.core import Request, Result, Row, RowError
from batchvl.io.writer import jsonish
from batchvl.media.image import decode_image
from batchvl.media.sources import as_reference_list, describe, load_bytes
from batchvl.media.tiling import normalize_tiles, tile_image
from batchvl.prompt import PromptBuilder, fill_fields, place_images


@dataclass(frozen=True)
class PrepareSettings:
    prompt: str | None
    prompt_column: str | None
    image_column: str | None
    max_dynamic_patch_column: str | None
    keep_columns: tuple[str, ...]
    keep_as_json: bool  # JSONL input: non-string keep values are written as JSON text
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    tile_size: int
    max_prompt_tokens: int


class RowPreparer:
    """Prepares rows for the engine. Thread-safe: it holds no per-row state."""

    def __init__(self, settings: PrepareSettings, prompts: PromptBuilder):
        self.s = settings
        self.prompts = prompts

    def __call__(self, row: Row, media_root: Path) -> Request | Result:
        keep = self._keep(row.data) if row.data is not None else {}
        if row.error is not None:
            return Result.failed(row.id, row.error, keep)
        try:
            return self._prepare(row, media_root, keep)
        except RowError as e:
            return Result.failed(row.id, str(e), keep)
        except Exception as e:  # a bug or an unforeseen input must still cost one row, not the run
            return Result.failed(row.id, f"internal: {type(e).__name__}: {e}", keep)

    def _prepare(self, row: Row, media_root: Path, keep: dict[str, Any]) -> Request:
        s, data = self.s, row.data
        text = self._prompt_text(data)
        refs = as_reference_list(data.get(s.image_column)) if s.image_column else []
        max_tiles = self._max_tiles(data)
        tiles_per_image: list[int] = []
        pixels: list[torch.Tensor] = []
        for ref in refs:
            image = decode_image(load_bytes(ref, media_root), describe(ref))
            tiles = tile_image(image, min(s.min_tiles, max_tiles), max_tiles, s.use_thumbnail, s.tile_size)
            tiles_per_image.append(len(tiles))
            pixels.append(normalize_tiles(tiles))
        text = place_images(text, len(refs))
        ids = self.prompts.encode(text, tiles_per_image)
        if len(ids) > s.max_prompt_tokens:
            raise RowError(f"prompt: {len(ids)} tokens, more than the model accepts with room to generate "
                           f"({s.max_prompt_tokens}); use fewer tiles (media.max_dynamic_patch) or a shorter prompt")
        pixel_values = torch.cat(pixels) if pixels else None
        return Request(id=row.id, prompt_ids=ids, pixel_values=pixel_values, tiles_per_image=tiles_per_image,
                       keep=keep)

    def _prompt_text(self, data: dict[str, Any]) -> str:
        s = self.s
        if s.prompt_column is not None:
            value = data.get(s.prompt_column)
            if value is not None:
                if not isinstance(value, str):
                    raise RowError(f"input: {s.prompt_column!r} must be a string, got {type(value).__name__}")
                return value
            if s.prompt is None:
                raise RowError(f"input: the row has no prompt in column {s.prompt_column!r}")
        return fill_fields(s.prompt, data)

    def _max_tiles(self, data: dict[str, Any]) -> int:
        column = self.s.max_dynamic_patch_column
        value = data.get(column) if column else None
        if value is None:
            return self.s.max_tiles
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RowError(f"input: {column!r} must be an integer >= 1, got {value!r}")
        return value

    def _keep(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.s.keep_as_json:
            return {c: jsonish(data.get(c)) for c in self.s.keep_columns}
        return {c: data.get(c) for c in self.s.keep_columns}
