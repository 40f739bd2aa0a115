"""Decoding image bytes into an upright RGB Pillow image."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from batchvl.config.spec import DEFAULT_MAX_IMAGE_PIXELS
from batchvl.errors import RowError
from batchvl.media.limits import machine_errno, persistent

# Our own limit (media.max_image_pixels, by default Pillow's error threshold) replaces Pillow's global guard, which
# warns at 89M pixels and refuses at twice that whatever the job says.
Image.MAX_IMAGE_PIXELS = None
# Every format plugin imported now, not on the first image of its format: a lazy import opens files, and on a
# machine out of file descriptors that would fail the row ("cannot decode ...: Too many open files").
Image.init()


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode with Pillow, apply the EXIF orientation, and return RGB.

    Images above `max_pixels` are refused from their header, before decoding (decompression bombs).
    Transparent images are composited on white rather than losing their alpha to black; animated and
    multi-page files give their first frame. An RGB image is returned as decoded, without a copy: the peak
    memory is what `decoded_bytes` says, which the prefetcher reserves before decoding.
    """
    if not data:
        raise RowError(f"media: empty file: {name}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_pixels(img.width, img.height, max_pixels, name)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise RowError(f"media: image too large (decompression bomb guard): {name}: {e}") from None
    except UnidentifiedImageError:
        raise RowError(f"media: not a decodable image: {name}") from None
    except (OSError, SyntaxError, ValueError) as e:
        code = machine_errno(e)
        if code is not None:
            raise persistent(code, name, 1) from None
        raise RowError(f"media: cannot decode {name}: {e}") from None


def check_pixels(width: int, height: int, max_pixels: int | None, name: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise RowError(f"media: image too large: {width}x{height} is more than "
                       f"media.max_image_pixels ({max_pixels}): {name}")


# Bytes per pixel at the peak of decoding and tiling, by the mode Pillow opens (measured on 4000x4000 images,
# rounded up). Pillow keeps 1 byte a pixel for 1/L/P and 4 for RGB and anything with alpha; converting to RGB adds
# a copy, transparency a white background, a composite and a conversion, 16-bit greyscale a float64 array; the
# first pass of the tiling resize adds up to about 1.5.
_PEAK_BYTES_PER_PIXEL = {"1": 7, "L": 7, "P": 7, "RGB": 6, "RGBA": 17, "RGBa": 17, "LA": 21, "La": 21, "PA": 21,
                         "I;16": 30, "I;16B": 30, "I;16L": 30, "I": 30, "F": 30}
_OTHER_MODES = 10  # CMYK, YCbCr, LAB, HSV: the image and its RGB copy
_TRANSPARENT_P = 19  # a palette image with a transparent colour goes through RGBA


def decoded_bytes(width: int, height: int, mode: str, transparent: bool = False, rotated: bool = False) -> int:
    """About the most memory decode_image and tiling take for an image of this size and mode (an EXIF rotation
    adds a rotated copy)."""
    per_pixel = _TRANSPARENT_P if mode == "P" and transparent else _PEAK_BYTES_PER_PIXEL.get(mode, _OTHER_MODES)
    return width * height * (per_pixel + (4 if rotated else 0))


def decoded_size(data: bytes, name: str = "image", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> int:
    """The memory decoding `data` will take, from the image's header alone (Pillow reads no pixels to open it).
    RowError when the header says more than `max_pixels`; 0 when the header cannot be read (decoding then
    fails quickly and says why)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_pixels(img.width, img.height, max_pixels, name)
            # Not getexif(): for a PNG it decodes the whole image. An EXIF block may rotate it: count the copy.
            rotated = "exif" in img.info or getattr(img, "tag_v2", {}).get(0x0112, 1) != 1
            return decoded_bytes(img.width, img.height, img.mode, "transparency" in img.info, rotated)
    except RowError:
        raise
    except Exception:  # anything Pillow cannot open: decode_image reports it
        return 0


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype("uint8"), "L").convert("RGB")
    return img.convert("RGB")
