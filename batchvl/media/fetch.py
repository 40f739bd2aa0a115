"""Fetching media bytes asynchronously: local files and fsspec URLs on worker threads, http(s) with aiohttp,
data URIs and inline bytes at once.

One `Fetcher` lives on the prefetch event loop. HTTP requests share one session, a concurrency limit and
a per-request timeout; transient failures (connection errors, timeouts, 408/429/5xx) are retried with
exponential backoff. Every failure becomes a `RowError` that names the reference, except the machine's own
(out of file descriptors, memory, disk): those are retried and then raised as `TransientError`.

No item holds more than `max_media_bytes` in memory: sizes known in advance (stat, Content-Length, fsspec) are
checked before reading, and bodies are read in chunks, counted after decompression, and cut off at the cap.
Each item's bytes are reserved from the row's `Allowance` before they are read (see `limits.Share`).
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import ipaddress
import random
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchvl.errors import RowError
from batchvl.media import limits
from batchvl.media.files import open_fsspec, read_file, read_fsspec, regular_file_size
from batchvl.media.limits import UNLIMITED, Allowance, Share, machine_errno, persistent, retry_machine, too_large
from batchvl.media.sources import data_uri_size, decode_data_uri, describe, scheme_of

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
LOCAL_SCHEMES = ("", "file")
HTTP_CHUNK = 1 << 16
__all__ = ["Blob", "FetchSettings", "Fetcher", "load_blob", "load_bytes", "scheme_of"]


@dataclass(frozen=True)
class FetchSettings:
    http_timeout_s: float = 30.0
    http_retries: int = 3
    http_concurrency: int = 64
    backoff_s: float = 0.5
    max_retry_after_s: float = 60.0  # a server's Retry-After is waited for, up to this
    max_media_bytes: int = limits.DEFAULT_MAX_MEDIA_MB << 20  # media.max_media_mb: one item, in memory, at most
    machine_retries: int = limits.MACHINE_RETRIES  # EMFILE, ENOMEM ...: tries after the first before the run stops
    machine_backoff_s: float = limits.MACHINE_BACKOFF_S
    # False: http(s) media on loopback, private, link-local, unspecified, multicast or reserved addresses is
    # refused (a server fetching what its clients name must not reach its own network); jobs allow it.
    allow_private: bool = True


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


class _WaitForBytes(Exception):
    """The body needs more of the allowance than is free now: give the connection back, wait, ask again."""

    def __init__(self, n: int):
        self.n = n


class Fetcher:
    def __init__(self, settings: FetchSettings | None = None):
        self.s = settings or FetchSettings()
        self._http = None
        self._http_slots = asyncio.Semaphore(self.s.http_concurrency)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def fetch(self, ref: Any, media_root: Path | str, read_local: bool = True,
                    allowance: Allowance = UNLIMITED) -> Blob:
        """The bytes (or local path, when `read_local` is False) a reference points at, their size reserved from
        `allowance` before they are read. A local path handed over unread is not held in memory, and not capped.
        `media_root` is a folder, or the URL of one (an input file read through fsspec): a relative path is
        read from there."""
        if isinstance(media_root, str) and "://" in media_root and isinstance(ref, str) and scheme_of(ref) == "" \
                and not Path(ref).expanduser().is_absolute():
            ref = f"{media_root.rstrip('/')}/{ref}"
        if isinstance(ref, dict):
            data, path = ref.get("bytes"), ref.get("path")
            if data is not None:
                return await self.fetch(data, media_root, read_local, allowance)
            if path:
                return await self.fetch(path, media_root, read_local, allowance)
            raise RowError("media: image struct has neither bytes nor path")
        if isinstance(ref, str) and not ref.startswith("data:") and scheme_of(ref) in LOCAL_SCHEMES:
            path = self._local_path(ref, media_root)
            if not read_local:
                await self._retry(lambda: self._thread(regular_file_size, path), str(path))
                return Blob(str(path), path=path)
        share = Share(allowance)
        try:
            blob = await self._fetch_bytes(ref, media_root, share)
            await share.settle(len(blob.data))
            return blob
        except BaseException:
            share.drop()
            raise

    async def _fetch_bytes(self, ref: Any, media_root: Path | str, share: Share) -> Blob:
        cap = self.s.max_media_bytes
        if isinstance(ref, (bytes, bytearray, memoryview)):
            size = ref.nbytes if isinstance(ref, memoryview) else len(ref)
            if size > cap:
                raise too_large(describe(ref), cap, size)
            await share.wait_for(size)
            return Blob(describe(ref), data=bytes(ref))
        if not isinstance(ref, str):
            raise RowError(f"media: expected a path, URL, data URI, bytes or image struct, got {type(ref).__name__}")
        name = describe(ref)
        if ref.startswith("data:"):
            size = data_uri_size(ref)
            if size is not None and size > cap:
                raise too_large(name, cap, size)
            await share.wait_for(len(ref) if size is None else size)
            data = decode_data_uri(ref)
            if len(data) > cap:
                raise too_large(name, cap, len(data))
            return Blob(name, data=data)
        scheme = scheme_of(ref)
        if scheme in ("http", "https"):
            return Blob(name, data=await self._fetch_http(ref, share))
        if scheme in LOCAL_SCHEMES:
            path = self._local_path(ref, media_root)
            size = await self._retry(lambda: self._thread(regular_file_size, path), str(path))
            if size > cap:
                raise too_large(str(path), cap, size)
            await share.wait_for(size)
            return Blob(str(path), data=await self._retry(lambda: self._thread(read_file, path, cap), str(path)))
        fs, path, size = await self._retry(lambda: self._thread(open_fsspec, ref), name)
        if size is not None and size > cap:
            raise too_large(name, cap, size)
        await share.wait_for(cap if size is None else size)
        return Blob(name, data=await self._retry(lambda: self._thread(read_fsspec, fs, path, size, ref, cap), name))

    @staticmethod
    def _local_path(ref: str, media_root: Path) -> Path:
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(ref).path)) if scheme_of(ref) == "file" else Path(ref)
        path = path.expanduser()
        return path if path.is_absolute() else media_root / path

    @staticmethod
    async def _thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _retry(self, call, name: str):
        return await retry_machine(call, name, self.s.machine_retries, self.s.machine_backoff_s)

    async def _session(self):
        if self._http is None:
            import aiohttp

            timeout = aiohttp.ClientTimeout(total=self.s.http_timeout_s)
            kind = aiohttp.TCPConnector if self.s.allow_private else _public_connector()
            connector = kind(limit=self.s.http_concurrency)
            self._http = aiohttp.ClientSession(timeout=timeout, connector=connector,
                                               headers={"User-Agent": "batchvl"})
        return self._http

    async def _fetch_http(self, url: str, share: Share) -> bytes:
        import aiohttp

        session = await self._session()
        last, attempt, machine = "", 0, 0
        while True:
            asked = None  # the wait a 429 or 503 asks for (Retry-After), in seconds
            try:
                async with self._http_slots, session.get(url) as response:
                    if response.status == 200:
                        return await self._read_body(response, describe(url), share)
                    last = f"HTTP {response.status}"
                    if response.status not in TRANSIENT_HTTP:
                        break
                    asked = retry_after_s(response.headers.get("Retry-After"))
            except _WaitForBytes as wait:  # the connection and its slot are given back: wait for the bytes here
                await share.wait_for(wait.n)
                continue
            # The server broke HTTP itself (kind `http`), where a 404 or a timeout says the media is not there.
            except aiohttp.TooManyRedirects as e:
                raise RowError(f"http: cannot fetch {describe(url)}: too many redirects "
                               f"({len(e.history)})") from None
            except aiohttp.ClientResponseError as e:  # the reply was not HTTP, or broke its rules
                raise RowError(f"http: cannot fetch {describe(url)}: {_bad_reply(e)}") from None
            except aiohttp.InvalidURL:
                raise RowError(f"media: invalid URL {describe(url)}") from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError) as e:
                code = machine_errno(e)
                if code is not None:  # not the server's fault, nor the row's: wait, without using up a retry
                    if machine == self.s.machine_retries:
                        raise persistent(code, describe(url), machine + 1) from None
                    await asyncio.sleep(self.s.machine_backoff_s * 2 ** machine)
                    machine += 1
                    continue
                last = _connection_reason(e)
            except aiohttp.ClientError as e:
                raise RowError(f"media: cannot fetch {describe(url)}: {type(e).__name__}: "
                               f"{_first_line(str(e))}") from None
            if attempt == self.s.http_retries:
                break
            attempt += 1
            wait = self.s.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
            if asked is not None:  # the server's own word, up to the cap (a slot is not held meanwhile)
                wait = max(wait, min(asked, self.s.max_retry_after_s))
            await asyncio.sleep(wait)
        tries = f" after {attempt + 1} attempts" if attempt else ""
        raise RowError(f"media: cannot fetch {describe(url)}: {last}{tries}")

    async def _read_body(self, response, name: str, share: Share) -> bytes:
        """The body, decompressed, in chunks: refused from Content-Length, or cut off, past the cap. Bytes are
        taken from the share as they come (raising _WaitForBytes when that would mean waiting)."""
        cap = self.s.max_media_bytes
        length = response.content_length
        if length is not None and length > cap:  # compressed or not, refused before a byte is read
            raise too_large(name, cap, length)
        identity = response.headers.get("Content-Encoding", "identity").lower() == "identity"
        expected = length if identity else None
        if expected is not None and not share.stretch(expected):
            raise _WaitForBytes(expected)
        body = io.BytesIO()  # its getvalue() hands over the buffer: no second copy of the body
        async for chunk in response.content.iter_chunked(HTTP_CHUNK):
            total = body.tell() + len(chunk)
            if total > cap:
                raise too_large(name, cap)
            if total > share.n and not share.stretch(min(cap, max(total, 2 * share.n, 1 << 20))):
                raise _WaitForBytes(cap if expected is None else max(expected, total))
            body.write(chunk)
        return body.getvalue()


def refused_address(address: str) -> str | None:
    """Why an IP address is not a public one (`loopback`, `private`, ...), or None when it is."""
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone index is not part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None


def _public_connector():
    """aiohttp's TCPConnector that refuses hosts resolving to a non-public address. The check sits where every
    connection's host is resolved (IP literals included, redirects too), on the addresses it then connects to,
    so a name that resolves differently a second time (DNS rebinding) gains nothing."""
    import aiohttp

    class PublicConnector(aiohttp.TCPConnector):
        async def _resolve_host(self, host, port, traces=None):
            hosts = await super()._resolve_host(host, port, traces=traces)
            for h in hosts:
                why = refused_address(h["host"])
                if why is not None:
                    raise RowError(f"media: refused to fetch from {host} ({h['host']} is a {why} address; "
                                   "the server fetches only from public addresses)")
            return hosts

    return PublicConnector


def _connection_reason(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    text = str(e) or type(e).__name__
    if "Connect call failed" in text or "Connection refused" in text:
        return "connection refused"
    return text


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header's wait in seconds: delay-seconds, or an HTTP date (RFC 9110); None when absent or
    unreadable. A date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]


def _bad_reply(e: BaseException) -> str:
    message = _first_line(getattr(e, "message", "") or str(e))
    if "status line" in message.lower():
        return f"not an HTTP reply ({message.rstrip(':')})"
    return f"bad HTTP reply: {message}"


def load_blob(ref: Any, media_root: Path | str | None, read_local: bool = True,
              settings: FetchSettings | None = None) -> Blob:
    """Fetch one reference synchronously (for callers outside the prefetch loop)."""

    async def one():
        fetcher = Fetcher(settings)
        try:
            url_root = isinstance(media_root, str) and "://" in media_root
            return await fetcher.fetch(ref, media_root if url_root else Path(media_root or "."), read_local)
        finally:
            await fetcher.close()

    return asyncio.run(one())


def load_bytes(ref: Any, media_root: Path | None, settings: FetchSettings | None = None) -> bytes:
    """The bytes a reference points at. Raises RowError with a message naming the reference."""
    return load_blob(ref, media_root, settings=settings).data
