"""From fetched bytes to uint8 tiles: the CPU-heavy part of media, one item at a time.

`tile_media` is the whole of it for one image or one video: decode, EXIF orientation, RGB, InternVL's tiling,
uint8 arrays. It runs in a preparation thread, or in a worker process (batchvl.media.pool), which must give
byte-identical tiles and the same errors: both call this one function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from batchvl.media.fetch import Blob
from batchvl.media.image import decode_image
from batchvl.media.tiling import Grid, cut_image, image_grid
from batchvl.media.video import decode_frames

Out = Callable[[int], np.ndarray]  # a tile count T -> memory for T tiles: uint8 [T, S, S, 3], C-contiguous


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


class Tiled(NamedTuple):
    """One media item's tiles: a uint8 array [T, S, S, 3] per image (a video: per sampled frame), and the grid
    each image was cut by (output.include_prompt shows them)."""

    arrays: list[np.ndarray]
    grids: list[Grid]


def tile_media(task: TileTask, out: Out | None = None) -> Tiled:
    """The item's tiles, one uint8 array [T, S, S, 3] per image (an image gives one, a video one per sampled
    frame), with their grids. Raises RowError for a bad item, TransientError when the machine ran out of
    something.

    `out(total)`, when given, returns the memory the item's `total` tiles are written to, a C-contiguous uint8
    array [total, S, S, 3], and the arrays returned are views of it: the tiles land where they are used (a
    worker's shared slot, a row's page-locked tensor) without another copy."""
    if task.kind == "video":
        images = decode_frames(task.blob, task.frames, task.bound)
    else:
        images = [decode_image(task.blob.data, task.blob.name, task.max_pixels)]
    grids = [image_grid(image.width, image.height, task.min_tiles, task.max_tiles, task.use_thumbnail,
                        task.tile_size) for image in images]
    tiled = [cut_image(image, grid, task.tile_size) for image, grid in zip(images, grids, strict=True)]
    del images  # a video's frames, at full size, before its tiles are copied
    total = sum(len(tiles) for tiles in tiled)
    size = task.tile_size
    into = out(total) if out is not None else np.empty((total, size, size, 3), np.uint8)  # [T, S, S, 3]
    for i, tile in enumerate(tile for tiles in tiled for tile in tiles):
        into[i] = np.asarray(tile, dtype=np.uint8)
    return Tiled(split_tiles(into, [len(tiles) for tiles in tiled]), grids)


def split_tiles(tiles: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """Views of `tiles` [T, S, S, 3], one per image of `counts` tiles."""
    views, start = [], 0
    for n in counts:
        views.append(tiles[start:start + n])
        start += n
    return views


def place_tiles(arrays: list[np.ndarray], out: Out) -> list[np.ndarray]:
    """`arrays` (one per image) copied into one block of memory from `out`, as views of it."""
    into = out(sum(a.shape[0] for a in arrays))
    np.concatenate(arrays, out=into)
    return split_tiles(into, [a.shape[0] for a in arrays])
