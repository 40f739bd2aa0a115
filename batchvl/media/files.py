"""Reading media from local files and fsspec URLs, at most `max_media_bytes` of each.

These run on a worker thread (the fetcher awaits them). A local file is checked with `stat` before it is
opened: only a regular file is read (a named pipe, a device or a socket would block or never end), and its size
is compared with the cap before a byte is read. Machine-side OSErrors (EMFILE ...) pass through untouched, for
the fetcher to retry; everything else becomes a RowError that names the file.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchvl.errors import RowError
from batchvl.media.limits import machine_errno, too_large
from batchvl.media.sources import describe, scheme_of

CHUNK = 1 << 20  # reads of a size unknown in advance go this much at a time
_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


def regular_file_size(path: Path) -> int:
    """The size of `path` when it is a regular file (symlinks followed); RowError when it is missing, a directory,
    a pipe, a device, a socket or a symlink loop."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise RowError(f"media: no such file: {path}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RowError(f"media: not a regular file (a symlink loop): {path}") from None
        if machine_errno(e) is not None:
            raise
        raise RowError(f"media: cannot read {path}: {e.strerror or e}") from None
    _check_regular(st.st_mode, path)
    return st.st_size


def _check_regular(mode: int, path: Any) -> None:
    if stat.S_ISDIR(mode):
        raise RowError(f"media: is a directory, not a file: {path}")
    if not stat.S_ISREG(mode):
        raise RowError(f"media: not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'not a file')}): {path}")


def read_file(path: Path, cap: int) -> bytes:
    """The bytes of a regular file of at most `cap` bytes."""
    size = regular_file_size(path)
    if size > cap:
        raise too_large(str(path), cap, size)
    try:
        # O_NONBLOCK: should a named pipe have taken the file's place since the stat, opening it must not wait
        # for a writer. fstat then checks what was really opened.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _read_error(e, path) from None
    try:
        _check_regular(os.fstat(fd).st_mode, path)
        return read_capped(lambda n: os.read(fd, n), size, cap, str(path))
    except OSError as e:
        raise _read_error(e, path) from None
    finally:
        os.close(fd)


def _read_error(e: OSError, path: Path) -> Exception:
    if machine_errno(e) is not None:
        return e
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return RowError(f"media: no such file: {path}")
    if e.errno == errno.ELOOP:
        return RowError(f"media: not a regular file (a symlink loop): {path}")
    return RowError(f"media: cannot read {path}: {e.strerror or e}")


def read_capped(read: Callable[[int], bytes], expected: int | None, cap: int, name: str) -> bytes:
    """Read to the end with `read(n)`, raising RowError once more than `cap` bytes came. `expected` (a size
    known in advance) sizes the first read, so that a file usually takes one read and no copy."""
    first = read(min(expected, cap) + 1 if expected is not None else min(CHUNK, cap + 1))
    if len(first) > cap:
        raise too_large(name, cap)
    piece = read(min(CHUNK, cap + 1 - len(first))) if first else b""
    if not piece:
        return first  # the usual case: one read, no copy
    body = io.BytesIO()  # its getvalue() hands over the buffer: no second copy of the whole
    body.write(first)
    del first
    while piece:
        body.write(piece)
        if body.tell() > cap:
            raise too_large(name, cap)
        piece = read(min(CHUNK, cap + 1 - body.tell()))
    return body.getvalue()


def open_fsspec(url: str) -> tuple[Any, str, int | None]:
    """The fsspec filesystem, path and size (None when the filesystem does not say) of an s3://, gs://, hf://,
    memory:// ... URL, when fsspec and the protocol's package are installed."""
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
        raise _fsspec_error(e, url, "open") from None
    try:
        size = fs.size(path)
    except Exception as e:
        if machine_errno(e) is not None:
            raise
        size = None  # not every backend knows; missing objects are reported when read
    return fs, path, size if isinstance(size, int) else None


def read_fsspec(fs: Any, path: str, size: int | None, url: str, cap: int) -> bytes:
    """The bytes of an fsspec object of at most `cap` bytes."""
    if size is not None and size > cap:
        raise too_large(describe(url), cap, size)
    try:
        with fs.open(path, "rb") as f:
            return read_capped(f.read, size, cap, describe(url))
    except FileNotFoundError:
        raise RowError(f"media: no such object: {url}") from None
    except IsADirectoryError:
        raise RowError(f"media: is a directory, not a file: {url}") from None
    except RowError:
        raise
    except Exception as e:  # backends raise their own types (botocore, gcsfs ...)
        raise _fsspec_error(e, url, "read") from None


def _fsspec_error(e: Exception, url: str, verb: str) -> Exception:
    if machine_errno(e) is not None:
        return e
    return RowError(f"media: cannot {verb} {describe(url)}: {type(e).__name__}: {e}")
