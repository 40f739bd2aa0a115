"""Fetching media bytes asynchronously: local files with aiofiles, http(s) with aiohttp, fsspec URLs in a
thread, data URIs and inline bytes at once.

One `Fetcher` lives on the prefetch event loop. HTTP requests share one session, a concurrency limit and
a per-request timeout; transient failures (connection errors, timeouts, 408/429/5xx) are retried with
exponential backoff. Every failure becomes a `RowError` that names the reference.
"""

from __future__ import annotations

import asyncio
import random
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles

from batchvl.errors import RowError
from batchvl.media.sources import decode_data_uri, describe

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
LOCAL_SCHEMES = ("", "file")


@dataclass(frozen=True)
class FetchSettings:
    http_timeout_s: float = 30.0
    http_retries: int = 3
    http_concurrency: int = 64
    backoff_s: float = 0.5


@dataclass(frozen=True)
class Blob:
    """Fetched media: bytes, or for a local file its path (decoders that can read files take it directly)."""

    name: str
    data: bytes | None = None
    path: Path | None = None

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        try:
            return self.path.stat().st_size
        except OSError:
            return 0


def scheme_of(ref: str) -> str:
    scheme = urllib.parse.urlsplit(ref).scheme.lower()
    return "" if len(scheme) <= 1 else scheme  # one letter is a Windows drive


class Fetcher:
    def __init__(self, settings: FetchSettings | None = None):
        self.s = settings or FetchSettings()
        self._http = None
        self._http_slots = asyncio.Semaphore(self.s.http_concurrency)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def fetch(self, ref: Any, media_root: Path, read_local: bool = True) -> Blob:
        """The bytes (or local path, when `read_local` is False) a reference points at."""
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return Blob(describe(ref), data=bytes(ref))
        if isinstance(ref, dict):
            data, path = ref.get("bytes"), ref.get("path")
            if data is not None:
                return await self.fetch(data, media_root, read_local)
            if path:
                return await self.fetch(path, media_root, read_local)
            raise RowError("media: image struct has neither bytes nor path")
        if not isinstance(ref, str):
            raise RowError(f"media: expected a path, URL, data URI, bytes or image struct, got {type(ref).__name__}")
        if ref.startswith("data:"):
            return Blob(describe(ref), data=decode_data_uri(ref))
        scheme = scheme_of(ref)
        if scheme in ("http", "https"):
            return Blob(describe(ref), data=await self._fetch_http(ref))
        if scheme in LOCAL_SCHEMES:
            path = Path(urllib.parse.unquote(urllib.parse.urlsplit(ref).path)) if scheme == "file" else Path(ref)
            path = path.expanduser()
            path = path if path.is_absolute() else media_root / path
            if not read_local:
                _check_file(path)
                return Blob(str(path), path=path)
            return Blob(str(path), data=await _read_local(path))
        return Blob(describe(ref), data=await asyncio.get_running_loop().run_in_executor(None, _read_fsspec, ref))

    async def _session(self):
        if self._http is None:
            import aiohttp

            timeout = aiohttp.ClientTimeout(total=self.s.http_timeout_s)
            connector = aiohttp.TCPConnector(limit=self.s.http_concurrency)
            self._http = aiohttp.ClientSession(timeout=timeout, connector=connector,
                                               headers={"User-Agent": "batchvl"})
        return self._http

    async def _fetch_http(self, url: str) -> bytes:
        import aiohttp

        session = await self._session()
        last = ""
        for attempt in range(self.s.http_retries + 1):
            if attempt:
                await asyncio.sleep(self.s.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            try:
                async with self._http_slots, session.get(url) as response:
                    if response.status == 200:
                        return await response.read()
                    last = f"HTTP {response.status}"
                    if response.status not in TRANSIENT_HTTP:
                        break
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError) as e:
                last = _connection_reason(e)
            except aiohttp.InvalidURL:
                raise RowError(f"media: invalid URL {describe(url)}") from None
        tries = f" after {attempt + 1} attempts" if attempt else ""
        raise RowError(f"media: cannot fetch {describe(url)}: {last}{tries}")


def _connection_reason(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    text = str(e) or type(e).__name__
    if "Connect call failed" in text or "Connection refused" in text:
        return "connection refused"
    return text


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise RowError(f"media: is a directory, not a file: {path}")
    if not path.is_file():
        raise RowError(f"media: no such file: {path}")


async def _read_local(path: Path) -> bytes:
    _check_file(path)
    try:
        async with aiofiles.open(path, "rb") as f:
            return await f.read()
    except OSError as e:
        raise RowError(f"media: cannot read {path}: {e.strerror or e}") from None


def _read_fsspec(url: str) -> bytes:
    """s3://, gs://, hf://, memory:// ... through fsspec, when it and the protocol's package are installed."""
    scheme = scheme_of(url)
    try:
        import fsspec
    except ImportError:
        raise RowError(f"media: {scheme}:// URLs need fsspec (pip install fsspec and its {scheme} backend)") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ValueError as e:  # fsspec: "Protocol not known"
        raise RowError(f"media: unsupported URL scheme {scheme!r} in {describe(url)} ({e})") from None
    except ImportError as e:  # fsspec names the missing backend package, e.g. s3fs or gcsfs
        raise RowError(f"media: {scheme}:// URLs need an fsspec backend that is not installed: {e}") from None
    except Exception as e:  # some filesystems connect when created (ftp, sftp ...)
        raise RowError(f"media: cannot open {describe(url)}: {type(e).__name__}: {e}") from None
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise RowError(f"media: no such object: {url}") from None
    except IsADirectoryError:
        raise RowError(f"media: is a directory, not a file: {url}") from None
    except Exception as e:  # backends raise their own types (botocore, gcsfs ...)
        raise RowError(f"media: cannot read {describe(url)}: {type(e).__name__}: {e}") from None


def load_blob(ref: Any, media_root: Path | None, read_local: bool = True) -> Blob:
    """Fetch one reference synchronously (for callers outside the prefetch loop)."""

    async def one():
        fetcher = Fetcher()
        try:
            return await fetcher.fetch(ref, Path(media_root or "."), read_local)
        finally:
            await fetcher.close()

    return asyncio.run(one())


def load_bytes(ref: Any, media_root: Path | None) -> bytes:
    """The bytes a reference points at. Raises RowError with a message naming the reference."""
    return load_blob(ref, media_root).data
