"""Turning a media reference from a row into bytes.

A reference is a path (relative to the media root, or absolute, or file://), an http(s) URL, a data: URI,
raw bytes, or a Hugging Face `datasets` image struct {bytes, path}. A cell may also hold a list of these.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from batchvl.core import RowError

HTTP_TIMEOUT_S = 30.0


def as_reference_list(cell: Any) -> list[Any]:
    """The references in one cell: none for null or an empty list, one for a scalar, all of a list."""
    if cell is None:
        return []
    if isinstance(cell, (list, tuple)):
        return list(cell)
    return [cell]


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


def load_bytes(ref: Any, media_root: Path) -> bytes:
    """The bytes a reference points at. Raises RowError with a message naming the reference."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if isinstance(ref, dict):
        data, path = ref.get("bytes"), ref.get("path")
        if data is not None:
            return load_bytes(data, media_root)
        if path:
            return load_bytes(path, media_root)
        raise RowError("media: image struct has neither bytes nor path")
    if not isinstance(ref, str):
        raise RowError(f"media: expected a path, URL, data URI, bytes or image struct, got {type(ref).__name__}")
    if ref.startswith("data:"):
        return _decode_data_uri(ref)
    scheme = urllib.parse.urlsplit(ref).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_http(ref)
    if scheme == "file":
        return _read_file(Path(urllib.parse.unquote(urllib.parse.urlsplit(ref).path)), ref)
    if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise RowError(f"media: unsupported URL scheme {scheme!r} in {describe(ref)}")
    path = Path(ref).expanduser()
    return _read_file(path if path.is_absolute() else media_root / path, ref)


def _read_file(path: Path, ref: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RowError(f"media: no such file: {path}") from None
    except IsADirectoryError:
        raise RowError(f"media: is a directory, not a file: {path}") from None
    except OSError as e:
        raise RowError(f"media: cannot read {path}: {e.strerror or e}") from None


def _decode_data_uri(uri: str) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma:
        raise RowError(f"media: malformed data URI (no comma): {describe(uri)}")
    if not header.endswith(";base64"):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RowError(f"media: malformed base64 in data URI: {e}") from None


def _fetch_http(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "batchvl"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise RowError(f"media: HTTP {e.code} for {describe(url)}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RowError(f"media: cannot fetch {describe(url)}: {reason}") from None
