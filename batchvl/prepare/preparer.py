"""From an input row to an engine request, in two stages.

1. `plan` (cheap, on the prefetch loop): read the row's prompt or messages and its media references into a
   `RowPlan`: the conversation with one `<image>` placeholder per image (video frames already announced as
   `Frame{i}: <image>`), its row text shielded (prompt.py), and the list of media to fetch, with per-item tile
   limits. A row that is too long already, from its text and its images at their fewest tiles, stops here,
   before any media is fetched or decoded.
2. `build` (CPU work, on the preparation threads): decode the fetched media and tile it (there, or in worker
   processes: `media.prepare_processes`), render the conversation with the chat template and tokenize.

Any problem with a row (bad record, bad media, too long a prompt) becomes that row's error result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchvl.config.checks import LIMITS
from batchvl.config.spec import shown
from batchvl.core import Request, Result, Row, TileGrid, jsonish
from batchvl.errors import RowError, TransientError
from batchvl.io.openai_batch import sampling_conflict
from batchvl.media.fetch import Blob
from batchvl.media.pixels import Out, Tiled, TileTask, tile_media
from batchvl.media.sources import as_reference_list, check_struct
from batchvl.prepare.messages import flatten_messages
from batchvl.prepare.plan import MediaRef, RowPlan
from batchvl.prepare.prompt import IMAGE_PLACEHOLDER, PromptBuilder, fill_fields, place_images

VIDEO_PLACEHOLDER = "<video>"
# One media item to its tiles and grids, the tiles written where `out` says: tile_media, or TilePool.tile
Tiler = Callable[[TileTask, Out | None], Tiled]


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
    messages_column: str | None = None
    video_column: str | None = None
    video_frames_column: str | None = None
    video_bound_column: str | None = None
    video_frames: int = 8
    video_max_tiles: int = 1
    max_image_pixels: int | None = None
    max_new_tokens_column: str | None = None
    max_new_tokens: int = 0  # the job's generation.max_new_tokens: a row may ask for fewer, not more
    pin_memory: bool = False  # tiles in page-locked memory, so the engine copies them to the GPU asynchronously
    include_prompt: bool = False  # output.include_prompt: a request carries its readable prompt and tile grids
    # OpenAI batch requests (input.format openai-batch): the job's generation settings, which a request's
    # sampling parameters must repeat (io.openai_batch.sampling_conflict); its max_tokens is capped at the job's
    requests: dict[str, Any] | None = None


class RowTiles:
    """`out` for a Tiler: the row's tiles tensor [T, S, S, 3] uint8, made once their count is known. It is
    page-locked when the engine is on CUDA, made here in a preparation thread, so that the engine's thread only
    starts asynchronous copies."""

    def __init__(self, tile_size: int, pin_memory: bool):
        self.tile_size, self.pin_memory = tile_size, pin_memory
        self.tensor: torch.Tensor | None = None

    def __call__(self, total: int) -> np.ndarray:
        self.tensor = torch.empty((total, self.tile_size, self.tile_size, 3), dtype=torch.uint8,
                                  pin_memory=self.pin_memory)
        return self.tensor.numpy()


class RowPreparer:
    """Plans and builds rows. Thread-safe: it holds no per-row state."""

    def __init__(self, settings: PrepareSettings, prompts: PromptBuilder):
        self.s = settings
        self.prompts = prompts

    # ---- stage 1: the plan ------------------------------------------------------------------------------

    def plan(self, row: Row, media_root: Path | str) -> RowPlan | Result:
        keep = self._keep(row.data) if row.data is not None else {}
        if row.error is not None:
            return Result.failed(row.id, row.error, keep)
        try:
            if self.s.messages_column is not None:
                messages, media = self._plan_messages(row.data)
            else:
                messages, media = self._plan_prompt(row.data)
            max_new = self._max_new_tokens(row.data)
            if self.s.requests is not None:
                self._check_request(row.data)
            self._check_length(messages, media)
        except RowError as e:
            return Result.failed(row.id, str(e), keep)
        except Exception as e:  # a bug or an unforeseen input must cost one row, not the run
            return Result.failed(row.id, f"internal: {type(e).__name__}: {e}", keep)
        return RowPlan(row, media_root, messages, media, keep, max_new)

    def _plan_prompt(self, data: dict[str, Any]) -> tuple[list[dict[str, str]], list[MediaRef]]:
        s = self.s
        text = self._prompt_text(data)
        tiles = LIMITS["media.max_dynamic_patch"]
        max_tiles = self._row_int(data, s.max_dynamic_patch_column, s.max_tiles,
                                  (tiles, f"{tiles}, the most tiles a row may ask for"))
        images = [MediaRef("image", r, max_tiles) for r in self._refs(data, s.image_column)]
        text = place_images(text, len(images))
        videos = self._refs(data, s.video_column)
        if not videos:
            return [{"role": "user", "content": text}], images
        if len(videos) > 1:
            raise RowError("input: one video per row is supported")
        # Before the frames are announced in the prompt: 10^8 "Frame{i}: <image>" lines would take gigabytes.
        most = LIMITS["media.video_frames"]
        frames = self._row_int(data, s.video_frames_column, s.video_frames,
                               (most, f"the {most} frames a video may give"))
        bound = self._bound(data)
        video = MediaRef("video", videos[0], s.video_max_tiles, frames, bound)
        announce = "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(frames))
        if VIDEO_PLACEHOLDER in text:  # the video goes where the prompt says, among its images
            before = text.split(VIDEO_PLACEHOLDER)[0].count(IMAGE_PLACEHOLDER)
            text = text.replace(VIDEO_PLACEHOLDER, announce, 1)
            return [{"role": "user", "content": text}], images[:before] + [video] + images[before:]
        return [{"role": "user", "content": announce + text}], [video] + images

    def _plan_messages(self, data: dict[str, Any]) -> tuple[list[dict[str, str]], list[MediaRef]]:
        return flatten_messages(data.get(self.s.messages_column), self.s.max_tiles, self.s.messages_column,
                                self.prompts.shield)

    def _check_length(self, messages: list[dict[str, str]], media: list[MediaRef]) -> None:
        """Refuse a row that cannot fit whatever its media turn out to be: its images at their fewest tiles,
        then (only when its text could matter: more bytes than the room left) a lower bound on its text's
        tokens. The exact count, after tiling, is `_build`'s."""
        s = self.s
        images = sum(max(m.frames, 1) if m.kind == "video" else 1 for m in media)
        tiles = sum(min(s.min_tiles, m.max_tiles) * (max(m.frames, 1) if m.kind == "video" else 1) for m in media)
        least = tiles * self.prompts.tokens_per_tile
        if least > s.max_prompt_tokens:
            raise RowError(f"prompt: at least {least} tokens for its {images} image(s) alone ({tiles} tiles at the "
                           f"fewest), more than the model accepts with room to generate ({s.max_prompt_tokens}); "
                           "use fewer images")
        room = s.max_prompt_tokens - least
        texts = [m["content"] for m in messages]
        if sum(map(len, texts)) <= room and sum(len(t.encode()) for t in texts) <= room:
            return  # the usual case: no more tokens than bytes, so nothing to count here
        least += self.prompts.tokens_at_least(texts, room)
        if least > s.max_prompt_tokens:
            raise RowError(f"prompt: at least {least} tokens, more than the model accepts with room to generate "
                           f"({s.max_prompt_tokens}); use a shorter prompt or fewer images")

    # ---- stage 2: the build (CPU) -----------------------------------------------------------------------

    def build(self, plan: RowPlan, blobs: Sequence[Blob], tile: Tiler = tile_media) -> Request | Result:
        """The row's request, or its error result. `tile` decodes and tiles each media item: `tile_media` here,
        in this thread, or a TilePool's `tile`, in a worker process; both give the same tiles and errors."""
        try:
            return self._build(plan, blobs, tile)
        except RowError as e:
            return Result.failed(plan.row.id, str(e), plan.keep)
        except TransientError:  # the machine's failure, not the row's: the run stops, a rerun resumes
            raise
        except Exception as e:  # a bug or an unforeseen input must cost one row, not the run
            return Result.failed(plan.row.id, f"internal: {type(e).__name__}: {e}", plan.keep)

    def _build(self, plan: RowPlan, blobs: Sequence[Blob], tile: Tiler) -> Request:
        s = self.s
        tiles_per_image: list[int] = []
        pixels: list[torch.Tensor] = []
        grids = []  # how each image (a video: each frame) was tiled, in tiles_per_image's order
        # A row of one media item (most rows) has its tiles written straight into the row's tensor; a row of
        # several gathers them below.
        into = RowTiles(s.tile_size, s.pin_memory) if len(plan.media) == 1 else None
        for item, blob in zip(plan.media, blobs, strict=True):
            task = TileTask(blob, item.kind, min(s.min_tiles, item.max_tiles), item.max_tiles, s.use_thumbnail,
                            s.tile_size, s.max_image_pixels, item.frames, item.bound)
            tiled = tile(task, into)
            grids += tiled.grids
            for tiles in tiled.arrays:  # [T, S, S, 3] uint8, one array per image (a video: per frame)
                tiles_per_image.append(tiles.shape[0])
                pixels.append(torch.from_numpy(tiles))
        ids = self.prompts.encode_messages(plan.messages, tiles_per_image)
        if len(ids) > s.max_prompt_tokens:
            raise RowError(f"prompt: {len(ids)} tokens, more than the model accepts with room to generate "
                           f"({s.max_prompt_tokens}); use fewer tiles (media.max_dynamic_patch) or a shorter prompt")
        tiles = into.tensor if into is not None else None
        if into is None and pixels:  # one copy gathers them, into page-locked memory on CUDA (see RowTiles)
            tiles = torch.empty((sum(p.shape[0] for p in pixels), *pixels[0].shape[1:]), dtype=torch.uint8,
                                pin_memory=s.pin_memory)
            torch.cat(pixels, out=tiles)
        request = Request(id=plan.row.id, prompt_ids=ids, tiles=tiles,
                          tiles_per_image=tiles_per_image, keep=plan.keep, max_new_tokens=plan.max_new_tokens)
        if s.include_prompt:  # what `batchvl preview` shows, from the same helper
            request.prompt = self.prompts.readable(plan.messages, tiles_per_image)
            per_tile = self.prompts.tokens_per_tile
            request.tile_grids = [TileGrid(g.cols, g.rows, g.thumbnail, n * per_tile)
                                  for g, n in zip(grids, tiles_per_image, strict=True)]
        return request

    # ---- helpers ----------------------------------------------------------------------------------------

    def _prompt_text(self, data: dict[str, Any]) -> str:
        s = self.s
        if s.prompt_column is not None:
            value = data.get(s.prompt_column)
            if value is not None:
                if not isinstance(value, str):
                    raise RowError(f"input: {s.prompt_column!r} must be a string, got {type(value).__name__}")
                return self.prompts.shield(value)
            if s.prompt is None:
                raise RowError(f"input: the row has no prompt in column {s.prompt_column!r}")
        return fill_fields(s.prompt, data, self.prompts.shield)

    @staticmethod
    def _refs(data: dict[str, Any], column: str | None) -> list[Any]:
        if column is None:
            return []
        cell = data.get(column)
        if isinstance(cell, (int, float, bool)):
            raise RowError(f"input: {column!r} holds a {type(cell).__name__}, not a media reference")
        refs = as_reference_list(cell)
        for i, ref in enumerate(refs):
            if isinstance(ref, dict):
                check_struct(ref, f"{column}[{i}]" if isinstance(cell, (list, tuple)) else column)
        return refs

    @staticmethod
    def _row_int(data: dict[str, Any], column: str | None, default: int,
                 most: tuple[int, str] | None = None) -> int:
        """A row's own integer setting from `column` (>= 1, and at most `most`: the job setting's own bound,
        and how the error names it), or `default` where the row has none."""
        value = data.get(column) if column else None
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RowError(f"input: {column!r} must be an integer >= 1, got {shown(value)}")
        if most is not None and value > most[0]:
            raise RowError(f"input: {column!r} is {value}, more than {most[1]}")
        return value

    def _max_new_tokens(self, data: dict[str, Any]) -> int | None:
        column = self.s.max_new_tokens_column
        if column is None or data.get(column) is None:
            return None
        value = self._row_int(data, column, 0)
        if self.s.requests is not None:  # an OpenAI request's max_tokens is a most, as OpenAI's is
            return min(value, self.s.max_new_tokens)
        if value > self.s.max_new_tokens:
            raise RowError(f"input: {column!r} is {value}, more than generation.max_new_tokens "
                           f"({self.s.max_new_tokens})")
        return value

    def _check_request(self, data: dict[str, Any]) -> None:
        why = sampling_conflict(data.get("sampling") or {}, self.s.requests)
        if why is not None:
            raise RowError(why)

    def _bound(self, data: dict[str, Any]) -> tuple[float, float] | None:
        column = self.s.video_bound_column
        value = data.get(column) if column else None
        if value is None:
            return None
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not ok or value[0] >= value[1]:
            raise RowError(f"input: {column!r} must be [start, end] in seconds with start < end, got {value!r}")
        return float(value[0]), float(value[1])

    def _keep(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.s.keep_as_json:
            return {c: jsonish(data.get(c)) for c in self.s.keep_columns}
        return {c: data.get(c) for c in self.s.keep_columns}
