"""What one media item may cost the machine, and the failures that are the machine's, not the row's.

`max_media_bytes` caps the bytes of one item held in memory (a file, a response body after decompression, a
data URI, an fsspec object); over it the row fails with a message naming `media.max_media_mb`. Running out of
file descriptors, memory or disk space (EMFILE, ENFILE, ENOMEM, ENOSPC ...) says nothing about the row: those
are retried with a short backoff and, when they persist, raised as `TransientError`, which stops the run
instead of writing a permanent row error.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from batchvl.errors import RowError, TransientError

T = TypeVar("T")

DEFAULT_MAX_MEDIA_MB = 512
MACHINE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC, errno.ENOBUFS, errno.EDQUOT}
MACHINE_RETRIES = 5  # attempts after the first: with the default backoff about 3 s in all
MACHINE_BACKOFF_S = 0.1


def too_large(name: str, cap: int, size: int | None = None) -> RowError:
    """The row error for an item over the cap: `media: NAME is 900 MB, larger than media.max_media_mb (512 MB)`."""
    what = f" is {_mb(size)}," if size is not None else " is"
    return RowError(f"media: {name}{what} larger than media.max_media_mb ({_mb(cap)})")


def _mb(n: int) -> str:
    if n < 1 << 20:
        return f"{n} bytes"
    return f"{n >> 20} MB" if n % (1 << 20) == 0 else f"{n / (1 << 20):.1f} MB"


def machine_errno(e: BaseException) -> int | None:
    """The errno of a machine-side failure (out of fds, memory, disk) in `e` or what it wraps, else None."""
    for _ in range(5):  # aiohttp wraps the socket's OSError; so may others
        if isinstance(e, OSError) and e.errno in MACHINE_ERRNOS:
            return e.errno
        if isinstance(e, MemoryError):
            return errno.ENOMEM
        e = getattr(e, "os_error", None) or e.__cause__
        if e is None:
            break
    return None


def persistent(code: int, name: str, attempts: int) -> TransientError:
    hint = {errno.EMFILE: "raise the open-file limit (ulimit -n) or lower media.prefetch and media.http_concurrency",
            errno.ENFILE: "the system's open-file table is full; lower media.prefetch and media.http_concurrency",
            errno.ENOMEM: "lower media.prefetch_mb or media.prepare_threads",
            errno.ENOBUFS: "lower media.http_concurrency",
            errno.ENOSPC: "free disk space",
            errno.EDQUOT: "free disk space (quota)"}[code]
    return TransientError(f"media: the machine, not the row, failed on {name}: {errno.errorcode[code]} "
                          f"({os.strerror(code)}) {attempts} times; the run stops (rerun to resume): {hint}")


def backoff(attempt: int, base_s: float = MACHINE_BACKOFF_S) -> float:
    return base_s * 2 ** attempt


async def retry_machine(call: Callable[[], Awaitable[T]], name: str, retries: int = MACHINE_RETRIES,
                        base_s: float = MACHINE_BACKOFF_S) -> T:
    """Await `call()`; on a machine-side failure try again after a backoff, and raise TransientError once
    `retries` more attempts failed the same way. Other exceptions pass through."""
    for attempt in range(retries + 1):
        try:
            return await call()
        except (OSError, MemoryError) as e:
            _retry_or_raise(e, attempt, retries, name)
        await asyncio.sleep(backoff(attempt, base_s))
    raise AssertionError("unreachable")


def retry_machine_sync(call: Callable[[], T], name: str, retries: int = MACHINE_RETRIES,
                       base_s: float = MACHINE_BACKOFF_S) -> T:
    """`retry_machine` for code on a preparation thread (decoders that open files themselves)."""
    for attempt in range(retries + 1):
        try:
            return call()
        except (OSError, MemoryError) as e:
            _retry_or_raise(e, attempt, retries, name)
        time.sleep(backoff(attempt, base_s))
    raise AssertionError("unreachable")


def _retry_or_raise(e: OSError | MemoryError, attempt: int, retries: int, name: str) -> None:
    """Return (try again) if `e` is the machine's failure and tries are left; raise `e` itself if it is not the
    machine's, and TransientError once `retries` more attempts have failed."""
    code = machine_errno(e)
    if code is None:
        raise e
    if attempt == retries:
        raise persistent(code, name, attempt + 1) from None


class Allowance:
    """How much memory a row's media may hold. The fetcher reserves before it reads and gives back what it did
    not use; the prefetcher's allowance draws on its byte budget (this base class: no limit, never waits)."""

    async def reserve(self, n: int) -> None:
        """Take n bytes, waiting until they are free."""

    def try_reserve(self, n: int) -> bool:
        """Take n bytes if that needs no waiting; say whether they were taken."""
        return True

    def give_back(self, n: int) -> None:
        """Return n bytes taken before."""


UNLIMITED = Allowance()


class Share:
    """One media item's part of an allowance: reserved ahead (a known size, or the cap), settled to the real size.

    Waiting (`wait_for`) must happen outside any held connection: a row that waits for bytes while holding one of
    the HTTP slots could keep the row the consumer waits for from getting a slot."""

    def __init__(self, allowance: Allowance):
        self.allowance = allowance
        self.n = 0

    async def wait_for(self, n: int) -> None:
        if n > self.n:
            await self.allowance.reserve(n - self.n)
            self.n = n

    def stretch(self, n: int) -> bool:
        """Hold n bytes, if that needs no waiting."""
        if n > self.n:
            if not self.allowance.try_reserve(n - self.n):
                return False
            self.n = n
        return True

    async def settle(self, n: int) -> None:
        if n < self.n:
            self.allowance.give_back(self.n - n)
            self.n = n
        else:
            await self.wait_for(n)

    def drop(self) -> None:
        self.allowance.give_back(self.n)
        self.n = 0
