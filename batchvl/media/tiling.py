"""InternVL's dynamic tiling.

The grid choice follows OpenGVLab's `dynamic_preprocess` exactly, including its tie rule, because the model
was trained on its tiles: candidate grids (cols, rows) with min <= cols*rows <= max are ordered by tile
count; the grid whose aspect ratio is closest to the image's wins, and on an exact tie a later (larger)
grid replaces the current one when the image area exceeds half of that grid's pixel area. The image is
resized (bicubic) onto the grid, cut row-major into square tiles, and a thumbnail of the whole image is
appended when there is more than one tile.

PIL and numpy only, no torch: worker processes (batchvl.media.pool) import this to tile, and a process
that imports torch takes a second and 200 MB more to start. The normalisation the engine applies is in
`normalize`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image

TILE_SIZE = 448


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Grids (cols, rows) allowed between min and max tiles, in the reference's order.

    The reference builds a Python set and sorts it by tile count with a stable sort, so grids with the same
    count keep the set's iteration order, which follows the order the grids were first added in. The
    reference adds them in a triple loop (n, cols, rows in 1..n), cubic in max_tiles: 95 s for a hostile
    max of 1,600. Here each grid is added once, in the order of its first addition there (at n = the larger
    of min_tiles, cols and rows; within one n, cols then rows ascending), which builds the same set in the
    same order in quadratic time.
    """
    grids: set[tuple[int, int]] = set()
    for n in range(min_tiles, max_tiles + 1):
        for cols in range(1, n + 1):
            # At the first n every pair up to n is new; later, only those with n as cols or rows.
            for rows in range(1, n + 1) if n == min_tiles or cols == n else (n,):
                if min_tiles <= cols * rows <= max_tiles:
                    grids.add((cols, rows))
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, min_tiles: int, max_tiles: int,
                tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """The (cols, rows) grid InternVL picks for an image of this size."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


class Grid(NamedTuple):
    """The tiling of one image: cols x rows tiles, then its thumbnail when there is one."""

    cols: int
    rows: int
    thumbnail: bool

    @property
    def tiles(self) -> int:
        return self.cols * self.rows + self.thumbnail


def image_grid(width: int, height: int, min_tiles: int, max_tiles: int, use_thumbnail: bool = True,
               tile_size: int = TILE_SIZE) -> Grid:
    """The tiling InternVL gives an image of this size: `choose_grid`'s grid, and a thumbnail when asked for
    and there is more than one tile."""
    cols, rows = choose_grid(width, height, min_tiles, max_tiles, tile_size)
    return Grid(cols, rows, use_thumbnail and cols * rows > 1)


def cut_image(image: Image.Image, grid: Grid, tile_size: int = TILE_SIZE) -> list[Image.Image]:
    """An RGB image as the tiles of `grid`: resized onto it, cut row-major, then the thumbnail if any."""
    resized = image.resize((grid.cols * tile_size, grid.rows * tile_size), Image.Resampling.BICUBIC)
    tiles = []
    for r in range(grid.rows):
        for c in range(grid.cols):
            box = (c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size)
            tiles.append(resized.crop(box))
    if grid.thumbnail:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def tile_image(image: Image.Image, min_tiles: int, max_tiles: int, use_thumbnail: bool = True,
               tile_size: int = TILE_SIZE) -> list[Image.Image]:
    """Cut an RGB image into InternVL tiles: the grid's tiles row-major, then the thumbnail if any."""
    grid = image_grid(image.width, image.height, min_tiles, max_tiles, use_thumbnail, tile_size)
    return cut_image(image, grid, tile_size)


def tiles_to_array(tiles: list[Image.Image]) -> np.ndarray:
    """Tiles as one uint8 array [T, S, S, 3]: a quarter of the bytes of normalised float32, to hold and to copy
    to the GPU, which normalises them (`normalize.normalize_uint8`)."""
    return np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])
