"""The few types every stage speaks: a row read from the input, a request ready for the engine, a result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ERROR = "error"


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


def jsonish(value: Any) -> str | None:
    """A JSONL keep-column value as a string: strings as they are, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
