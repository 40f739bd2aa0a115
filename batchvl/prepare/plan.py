"""What preparing a row starts from: its conversation with image placeholders, and the media to fetch for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchvl.core import Row


@dataclass(frozen=True)
class MediaRef:
    kind: str  # image | video
    ref: Any
    max_tiles: int
    frames: int = 0  # video: frames to sample
    bound: tuple[float, float] | None = None  # video: (start, end) seconds


@dataclass
class RowPlan:
    row: Row
    media_root: Path | str  # a folder, or the URL of one (an input file read through fsspec)
    messages: list[dict[str, str]]  # role + content with <image> placeholders, in media order
    media: list[MediaRef] = field(default_factory=list)
    keep: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None
