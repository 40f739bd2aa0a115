"""The few types every stage speaks: a row read from the input, a request ready for the engine, a result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    # generation.n > 1: the samples of this row not yet in the output (a rerun resumes only those); None: all.
    samples: tuple[int, ...] | None = None


class TileGrid(NamedTuple):
    """How one image (a video: one frame) was tiled: its grid of cols x rows tiles, whether a thumbnail of the
    whole image follows them, and the image context tokens they take (output.include_prompt)."""

    cols: int
    rows: int
    thumbnail: bool
    tokens: int


@dataclass(slots=True)
class Request:
    """A row turned into model input: token ids with image context tokens expanded, and its tiles."""

    id: str
    prompt_ids: list[int]
    tiles: torch.Tensor | None  # [T, S, S, 3] uint8 RGB tiles, in image order; None when text-only
    tiles_per_image: list[int]
    keep: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None  # this row's own limit (input.max_new_tokens_column), at most the job's
    sample: int | None = None  # generation.n > 1: which of the row's samples this request is (0 .. n-1)
    prompt: str | None = None  # output.include_prompt: the rendered prompt, image tokens collapsed to a count
    tile_grids: list[TileGrid] | None = None  # output.include_prompt: one per image or video frame, in order

    @property
    def seed_key(self) -> str:
        """What the sampler's per-row seed is drawn from: the id, and for sample k >= 1 of a row `id#k`. Sample 0
        keeps the plain id, so generation.n: 1 draws as before and sample 0 of n samples is the n: 1 text."""
        return sample_key(self.id, self.sample)


def sample_key(id: str, sample: int | None) -> str:
    """A row's id, or for its sample k >= 1 `id#k`: what tells the samples of a row apart (seeds, line ids)."""
    return id if not sample else f"{id}#{sample}"


@dataclass(slots=True)
class Result:
    """What is written for one input row (for one of its samples, with generation.n > 1)."""

    id: str
    text: str | None
    error: str | None
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    keep: dict[str, Any] = field(default_factory=dict)
    images: int = 0
    sample: int | None = None  # generation.n > 1: the sample's index (the output's `sample` column)
    prompt: str | None = None  # output.include_prompt (None for an error row)
    tile_grids: list[TileGrid] | None = None  # output.include_prompt (None for an error row)

    @classmethod
    def failed(cls, id: str, error: str, keep: dict[str, Any] | None = None, sample: int | None = None) -> Result:
        return cls(id, None, error, FINISH_ERROR, 0, 0, keep or {}, sample=sample)


def jsonish(value: Any) -> str | None:
    """A JSONL keep-column value as a string: strings as they are, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
