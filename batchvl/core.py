"""The few types every stage speaks: a row read from the input, a request ready for the engine, a result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ERROR = "error"


class RowError(Exception):
    """A problem with one input row (bad media, bad record, prompt too long). It becomes that row's `error`."""


@dataclass(frozen=True, slots=True)
class Row:
    """One input record. `data` is None when the record itself could not be parsed; `error` then says why."""

    id: str
    source: str  # "file:line" for JSONL (1-based), "file:row" for Parquet (0-based)
    data: dict[str, Any] | None
    error: str | None = None


@dataclass(slots=True)
class Request:
    """A row turned into model input: token ids with image context tokens expanded, and its tiles."""

    id: str
    prompt_ids: list[int]
    tiles: torch.Tensor | None  # [T, S, S, 3] uint8 RGB tiles, in image order; None when text-only
    tiles_per_image: list[int]
    keep: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None  # this row's own limit (input.max_new_tokens_column), at most the job's

    def pixel_values(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """The tiles as the vision tower takes them: [T, 3, S, S], ImageNet-normalised, on `device`."""
        from batchvl.media.tiling import normalize_uint8

        return None if self.tiles is None else normalize_uint8(self.tiles.to(device), dtype)


@dataclass(slots=True)
class Result:
    """What is written for one input row."""

    id: str
    text: str | None
    error: str | None
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    keep: dict[str, Any] = field(default_factory=dict)
    images: int = 0

    @classmethod
    def failed(cls, id: str, error: str, keep: dict[str, Any] | None = None) -> Result:
        return cls(id, None, error, FINISH_ERROR, 0, 0, keep or {})
