"""`load_image` and `encode_image_base64`, as LMDeploy's `lmdeploy.vl.utils` offers them, on batchvl's media code.

`load_image` reads a reference the way a `batchvl run` row does (`media.fetch.load_bytes`: a path, a
file:// or http(s) URL, a data URI, bytes, an fsspec URL) and decodes it the way a row's image is decoded
(`media.image.decode_image`: EXIF orientation applied, transparency composited on white, RGB). The image a
pipeline then gets is therefore the image a job would have tiled.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from batchvl.errors import RowError
from batchvl.media.fetch import load_bytes
from batchvl.media.image import decode_image
from batchvl.media.sources import describe

T = TypeVar("T")
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")  # modes Pillow writes to PNG as they are


def png_bytes(image: Image.Image) -> bytes:
    """A lossless PNG of `image` (fast compression). Modes PNG cannot hold are converted to RGB first."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def load_image(image: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """An RGB Pillow image from a path, file:// or http(s) URL, data URI, bytes, or a Pillow image.

    Relative paths are read from the current directory. Raises ValueError naming the reference when it
    cannot be read or decoded.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else decode_image(png_bytes(image))
    ref: Any = os.fspath(image) if isinstance(image, os.PathLike) else image
    try:
        data = _outside_event_loop(load_bytes, ref, Path.cwd())
        return decode_image(data, describe(ref))
    except RowError as e:
        raise ValueError(f"load_image: {e}") from None


def encode_image_base64(image: str | os.PathLike | bytes | Image.Image, format: str = "PNG", **save_args) -> str:
    """The image encoded as `format` (PNG by default), as base64 text without a `data:` prefix.

    Anything `load_image` reads is accepted; `save_args` go to Pillow's `save` (e.g. quality=90).
    """
    if not isinstance(image, Image.Image):
        image = load_image(image)
    fmt = "JPEG" if format.upper() in ("JPG", "JPEG") else format.upper()
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_args)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _outside_event_loop(fn: Callable[..., T], *args: Any) -> T:
    """Call `fn` here, or on a worker thread when this thread already runs an event loop (a notebook):
    the synchronous loaders start their own loop, which a running loop forbids."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result()


__all__ = ["encode_image_base64", "load_image", "png_bytes"]
