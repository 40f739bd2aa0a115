"""Media references: what a row's cell may hold, and a synchronous way to load one.

A reference is a path (relative to the media root, or absolute, or file://), an http(s) URL, a data: URI,
raw bytes, a Hugging Face `datasets` image struct {bytes, path}, or an fsspec URL (s3://, gs://, ...). A
cell may also hold a list of these. Fetching them is `fetch.py`.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from typing import Any

from batchvl.errors import RowError


def as_reference_list(cell: Any) -> list[Any]:
    """The references in one cell: none for null or an empty list, one for a scalar, all of a list."""
    if cell is None:
        return []
    if isinstance(cell, (list, tuple)):
        return list(cell)
    return [cell]


def check_struct(ref: dict, where: str) -> None:
    """A Hugging Face image struct {bytes, path} as a cell holds it: `bytes` raw bytes or null, `path` a string or
    null, one of them set. `where` names the cell (`image`, `images[2]`); a RowError names the field in it."""
    data, path = ref.get("bytes"), ref.get("path")
    if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
        raise RowError(f"media: {where}.bytes: expected raw bytes or null in the image struct, got "
                       f"{type(data).__name__}")
    if path is not None and not isinstance(path, str):
        raise RowError(f"media: {where}.path: expected a string or null in the image struct, got "
                       f"{type(path).__name__}")
    if not data and not path:
        raise RowError(f"media: {where}: the image struct has neither bytes nor path (keys: "
                       f"{', '.join(map(str, ref)) or 'none'})")


def describe(ref: Any) -> str:
    """A short, printable name for a reference, for error messages."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return f"<{len(ref)} bytes>"
    if isinstance(ref, dict):
        return f"<image struct path={ref.get('path')!r}>"
    text = str(ref)
    if text.startswith("data:"):
        return text[:40] + "..."
    return text if len(text) <= 200 else text[:200] + "..."


def scheme_of(ref: str) -> str:
    scheme = urllib.parse.urlsplit(ref).scheme.lower()
    return "" if len(scheme) <= 1 else scheme  # one letter is a Windows drive


def data_uri_size(uri: str) -> int | None:
    """How many bytes a base64 data: URI decodes to, before decoding it; None for percent-encoding (no larger
    than the URI itself)."""
    header, _, payload = uri.partition(",")
    return len(payload.rstrip("=")) * 3 // 4 if header.endswith(";base64") else None


def decode_data_uri(uri: str) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma:
        raise RowError(f"media: malformed data URI (no comma): {describe(uri)}")
    if not header.endswith(";base64"):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RowError(f"media: malformed base64 in data URI: {e}") from None
