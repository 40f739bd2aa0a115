"""From fetched bytes to uint8 tiles: the CPU-heavy part of media, one item at a time.

`tile_media` is the whole of it for one image or one video: decode, EXIF orientation, RGB, InternVL's tiling,
uint8 arrays. It runs in a preparation thread, or in a worker process (batchvl.media.pool), which must give
byte-identical tiles and the same errors: both call this one function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchvl.media.fetch import Blob
from batchvl.media.image import decode_image
from batchvl.media.tiling import tile_image, tiles_to_array
from batchvl.media.video import decode_frames


@dataclass(frozen=True)
class TileTask:
    """One media item to tile, with everything the tiling needs (it crosses to worker processes, pickled)."""

    blob: Blob
    kind: str  # "image" | "video"
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    tile_size: int
    max_pixels: int | None  # media.max_image_pixels
    frames: int = 0  # video: frames sampled
    bound: tuple[float, float] | None = None  # video: [start, end] in seconds

    @property
    def name(self) -> str:
        return self.blob.name


def tile_media(task: TileTask) -> list[np.ndarray]:
    """The item's tiles, one uint8 array [T, S, S, 3] per image (an image gives one, a video one per sampled
    frame). Raises RowError for a bad item, TransientError when the machine ran out of something."""
    if task.kind == "video":
        images = decode_frames(task.blob, task.frames, task.bound)
    else:
        images = [decode_image(task.blob.data, task.blob.name, task.max_pixels)]
    return [tiles_to_array(tile_image(image, task.min_tiles, task.max_tiles, task.use_thumbnail, task.tile_size))
            for image in images]
