"""ImageNet normalisation of uint8 tiles, in torch, where the engine runs it (on the GPU when there is one)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from batchvl.media.tiling import tiles_to_array

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# (v / 255 - mean) / std for every uint8 value v, per channel, computed in float32 exactly as
# ToTensor + Normalize compute it, so a table lookup gives bit-identical results in one pass.
_NORMALIZE_LUT = ((np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)) - IMAGENET_MEAN[:, None]) \
    / IMAGENET_STD[:, None]  # [3, 256]


def tiles_to_uint8(tiles: list[Image.Image]) -> torch.Tensor:
    """Tiles as one uint8 tensor [T, S, S, 3], which normalize_uint8 normalises with the same table."""
    return torch.from_numpy(tiles_to_array(tiles))


_LUT_CACHE: dict[torch.device, torch.Tensor] = {}


def normalize_uint8(tiles: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 tiles [T, S, S, 3] (on any device) -> [T, 3, S, S] scaled to [0, 1] and ImageNet-normalised, in
    float32 exactly as ToTensor + Normalize compute it, then cast to `dtype`."""
    lut = _LUT_CACHE.get(tiles.device)
    if lut is None:
        lut = _LUT_CACHE[tiles.device] = torch.from_numpy(_NORMALIZE_LUT.reshape(-1).copy()).to(tiles.device)
    channel = torch.arange(3, device=tiles.device, dtype=torch.long) * 256  # row of each channel in the table
    out = lut[tiles.long() + channel]  # [T, S, S, 3] float32
    return out.permute(0, 3, 1, 2).contiguous().to(dtype)


def normalize_tiles(tiles: list[Image.Image]) -> torch.Tensor:
    """Tiles as a float32 tensor [T, 3, S, S]: scaled to [0, 1], then ImageNet mean/std normalised."""
    return normalize_uint8(tiles_to_uint8(tiles))
