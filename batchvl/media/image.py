"""Decoding image bytes into an upright RGB Pillow image."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from batchvl.errors import RowError

# Our own limit (media.max_image_pixels) replaces Pillow's global guard, which warns at 89M pixels and
# refuses at twice that whatever the job says.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 1 << 28  # 268M pixels, e.g. 16384 x 16384


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode with Pillow, apply the EXIF orientation, and return RGB.

    Images above `max_pixels` are refused from their header, before decoding (decompression bombs).
    Transparent images are composited on white rather than losing their alpha to black; animated and
    multi-page files give their first frame.
    """
    if not data:
        raise RowError(f"media: empty file: {name}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise RowError(f"media: image too large: {img.width}x{img.height} is more than "
                               f"media.max_image_pixels ({max_pixels}): {name}")
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise RowError(f"media: image too large (decompression bomb guard): {name}: {e}") from None
    except UnidentifiedImageError:
        raise RowError(f"media: not a decodable image: {name}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RowError(f"media: cannot decode {name}: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype("uint8"), "L").convert("RGB")
    return img.convert("RGB")
