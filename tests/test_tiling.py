"""Tiling against a plain restatement of OpenGVLab's published `dynamic_preprocess`."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from batchvl.media.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_tiles
from batchvl.media.tiling import choose_grid, tile_image

from .conftest import random_image

# --- the reference, restated from the published algorithm (InternVL chat model's preprocessing) -----------

def reference_grid(width, height, min_num, max_num, image_size=448):
    aspect_ratio = width / height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if min_num <= i * j <= max_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best = ratio
    return best


def reference_tiles(image, min_num, max_num, image_size=448, use_thumbnail=True):
    cols, rows = reference_grid(image.width, image.height, min_num, max_num, image_size)
    target_width, target_height = image_size * cols, image_size * rows
    resized = image.resize((target_width, target_height))  # Pillow's default resample: bicubic
    out = []
    for i in range(cols * rows):
        box = ((i % cols) * image_size, (i // cols) * image_size,
               ((i % cols) + 1) * image_size, ((i // cols) + 1) * image_size)
        out.append(resized.crop(box))
    if use_thumbnail and len(out) != 1:
        out.append(image.resize((image_size, image_size)))
    return out


def reference_normalize(tile):
    t = torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1).float().div(255)  # ToTensor
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (t - mean) / std  # Normalize


# --- tests --------------------------------------------------------------------------------------------

def test_grid_matches_reference_over_thousands_of_sizes():
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 5000, size=(3000, 2))]
    sizes += [(w, h) for w in range(16, 2400, 97) for h in range(16, 2400, 89)]
    checked = 0
    for max_num in (1, 6, 12, 24, 40):
        for w, h in sizes[:: 1 if max_num == 12 else 5]:
            assert choose_grid(w, h, 1, max_num) == reference_grid(w, h, 1, max_num), (w, h, max_num)
            checked += 1
    assert checked > 5000


@pytest.mark.parametrize("min_num,max_num", [(1, 12), (2, 6), (4, 12), (1, 1), (3, 3)])
def test_grid_exact_ties_follow_the_area_rule(min_num, max_num):
    # Sizes whose aspect ratio equals a grid's exactly (1:1 ties 1x1, 2x2, 3x3; 2:1 ties 2x1 and 4x2; ...),
    # or lies exactly between two grids' ratios, at areas on both sides of the half-area threshold.
    ratios = [(1, 1), (2, 1), (1, 2), (3, 2), (2, 3), (3, 1), (4, 3), (5, 4), (3, 4), (6, 1), (1, 6)]
    middles = [(3, 2), (5, 4), (5, 2), (7, 4)]  # 1.5 is halfway between 1 and 2, 1.25 between 1 and 1.5 ...
    seen_tie_flip = False
    for rw, rh in ratios + middles:
        for scale in (1, 7, 63, 64, 100, 150, 224, 225, 300, 448, 449, 600, 1000):
            w, h = rw * scale, rh * scale
            got = choose_grid(w, h, min_num, max_num)
            assert got == reference_grid(w, h, min_num, max_num), (w, h)
            seen_tie_flip |= got[0] * got[1] > 1 and got[0] == got[1]
    if max_num >= 4 and min_num == 1:
        assert seen_tie_flip  # large square images do move up from 1x1 to a larger square grid


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1), (10000, 3), (2, 3000), (448, 448), (896, 448)])
def test_grid_extreme_aspect_ratios(size):
    for max_num in (1, 12, 40):
        assert choose_grid(*size, 1, max_num) == reference_grid(*size, 1, max_num)


@pytest.mark.parametrize("size,max_num,use_thumbnail", [
    ((1344, 896), 12, True),  # 3x2 + thumbnail = 7 tiles
    ((500, 900), 6, True),
    ((2000, 300), 12, True),
    ((448, 448), 12, True),  # a single tile: no thumbnail
    ((1000, 700), 12, False),
    ((37, 19), 4, True),
])
def test_tiles_equal_reference_pixels(size, max_num, use_thumbnail):
    image = random_image(*size, seed=sum(size))
    ours = tile_image(image, 1, max_num, use_thumbnail)
    ref = reference_tiles(image, 1, max_num, use_thumbnail=use_thumbnail)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert a.size == (448, 448)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_seven_tiles_for_the_caption_workload():
    assert len(tile_image(random_image(1344, 896), 1, 12)) == 7


def test_normalize_equals_totensor_then_normalize():
    tiles = tile_image(random_image(900, 600, seed=3), 1, 4)
    got = normalize_tiles(tiles)
    assert got.shape == (len(tiles), 3, 448, 448) and got.dtype == torch.float32
    want = torch.stack([reference_normalize(t) for t in tiles])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert np.allclose(IMAGENET_MEAN, [0.485, 0.456, 0.406]) and np.allclose(IMAGENET_STD, [0.229, 0.224, 0.225])


def test_grid_respects_min_and_max():
    for w, h in [(100, 100), (5000, 100), (100, 5000), (3000, 2000)]:
        cols, rows = choose_grid(w, h, 3, 8)
        assert 3 <= cols * rows <= 8


def test_pillow_default_resample_is_bicubic():
    # The reference relies on Pillow's default; we pass bicubic explicitly. Guard that they still agree.
    image = random_image(300, 200)
    assert np.array_equal(np.asarray(image.resize((448, 448))),
                          np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC)))


def reference_grids(min_num, max_num):
    """The reference's candidate grids, in its order: the triple loop into a set, stably sorted by tile count."""
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if min_num <= i * j <= max_num)
    return tuple(sorted(target_ratios, key=lambda x: x[0] * x[1]))


def test_candidate_grids_are_the_references_in_its_order_without_its_cubic_loop():
    from batchvl.media.tiling import candidate_grids

    pairs = [(lo, hi) for hi in range(1, 48) for lo in range(1, hi + 1)] + [(1, 256), (7, 256), (100, 256)]
    for lo, hi in pairs:
        assert candidate_grids.__wrapped__(lo, hi) == reference_grids(lo, hi), (lo, hi)
    # A hostile max_dynamic_patch: the reference's loop would take minutes here (cubic); this is quadratic.
    start = time.perf_counter()
    grids = candidate_grids.__wrapped__(1, 2000)
    assert len(grids) == sum(2000 // c for c in range(1, 2001)) and time.perf_counter() - start < 10
