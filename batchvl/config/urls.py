"""`input.path` beyond a local path: fsspec URLs (`s3://bucket/shards/*.tar`, `gs://`, `hf://`, `memory://`),
`file://` URLs (read as the local path they name) and brace ranges (`shards/{000..009}.tar`, `{train,test}`),
which expand for local paths and URLs alike.

An input file named by a URL is a `RemoteFile`: its URL, opened with fsspec as it is read (io.text.open_input),
and its name below the input's root, which its rows' default ids carry, as a local file's path below
`InputSpec.root` does. So `s3://b/shards/000.tar` read through `s3://b/shards/*.tar` gives its rows the ids
`000.tar:key`, as the local `shards/000.tar` through `shards/*.tar` does.
"""

from __future__ import annotations

import glob
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from batchvl.config.values import shown
from batchvl.errors import JobError

MAX_BRACE_NAMES = 100_000  # a brace range expanding to more names than this is refused, not listed
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)(::[A-Za-z][A-Za-z0-9+.-]+)*://")
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass(frozen=True, order=True)
class RemoteFile:
    """An input file named by an fsspec URL. `below`: its path below the input's root (`InputSpec.root`),
    the file's part of its rows' default ids."""

    url: str
    below: str

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rpartition("/")[2]

    @property
    def folder(self) -> str:
        """The URL of the folder holding it (relative media references are read from there)."""
        return self.url.rstrip("/").rpartition("/")[0]

    def __str__(self) -> str:
        return self.url


InputFile = Path | RemoteFile  # a file of the input: a local one, or one read through fsspec


def is_url(path: str) -> bool:
    """Whether `input.path` is an fsspec URL read through fsspec: any `protocol://` but `file://`."""
    match = _URL.match(path)
    return match is not None and not (match.group(1).lower() == "file" and match.group(2) is None)


def local_path(path: str) -> str:
    """A `file://` URL as the local path it names (percent escapes decoded); anything else as it is."""
    if path[:7].lower() == "file://":
        return urllib.parse.unquote(urllib.parse.urlsplit(path).path)
    return path


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the path it names there. Raises a one-line JobError naming
    `input.path` for a protocol fsspec does not know, or whose package is not installed."""
    import fsspec
    from fsspec.registry import known_implementations

    protocol = _URL.match(url).group(1).lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
        raise JobError(f"input.path: {protocol}:// URLs need the {package} package (fsspec's {protocol} "
                       f"filesystem), which is not installed: pip install {package}") from None
    except ValueError as e:  # fsspec: "Protocol not known: ..."
        raise JobError(f"input.path: {shown(url, quote=False)}: fsspec has no filesystem for {protocol}:// "
                       f"({shown(str(e), quote=False)})") from None
    except Exception as e:  # some filesystems connect as they are made (ftp, sftp, ...)
        raise JobError(f"input.path: cannot open {shown(url, quote=False)}: {type(e).__name__}: "
                       f"{shown(str(e), quote=False)}") from None


def url_root(url: str) -> PurePosixPath:
    """The folder, as a path of the URL's filesystem, that a URL input's files are named below (as
    `InputSpec.root` for a local path): a file's own folder, the folder itself, or the leading folder of a
    glob or brace pattern."""
    fs, path = filesystem(url)
    path = path.rstrip("/") or "/"
    if has_pattern(path):
        return PurePosixPath(*_plain_parts(PurePosixPath(path)))
    return PurePosixPath(path) if _isdir(fs, path) else PurePosixPath(path).parent


def has_pattern(path: str) -> bool:
    """Whether a path holds a glob wildcard or a brace group that expands."""
    return glob.has_magic(path) or len(expand_braces(path)) > 1


def plain_root(path: Path) -> Path:
    """The leading folder of a local glob or brace pattern, before its first part with either."""
    return Path(*_plain_parts(path))


def _plain_parts(path: PurePosixPath | Path) -> list[str]:
    plain = []
    for part in path.parts:
        if has_pattern(part):
            break
        plain.append(part)
    return plain


def _isdir(fs: Any, path: str) -> bool:
    try:
        return bool(fs.isdir(path))
    except Exception:  # a backend's own errors (no such bucket, no access): listed later, with their message
        return False


def expand_braces(text: str) -> list[str]:
    """The names a brace pattern stands for, in order: `{000..009}` (zero-padded to the width written; a
    range may count down), `{a,b,c}`. Groups without `,` or `..` stay as written; nested groups are not
    expanded. Raises JobError past MAX_BRACE_NAMES names."""
    names = [text]
    while True:
        grown, changed = [], False
        for name in names:
            parts = _expand_first(name)
            changed = changed or parts is not None
            grown.extend([name] if parts is None else parts)
            if len(grown) > MAX_BRACE_NAMES:
                raise JobError(f"input.path: the brace pattern {shown(text, quote=False)} names more than "
                               f"{MAX_BRACE_NAMES:,} files")
        if not changed:
            return names
        names = grown


def _expand_first(name: str) -> list[str] | None:
    """`name` with its first expandable brace group expanded; None when it has none."""
    for match in _BRACES.finditer(name):
        body, head, tail = match.group(1), name[: match.start()], name[match.end():]
        numbers = _RANGE.match(body)
        if numbers:
            low, high = numbers.groups()
            start, stop = int(low), int(high)
            if abs(stop - start) >= MAX_BRACE_NAMES:
                raise JobError(f"input.path: the brace range {{{body}}} names more than {MAX_BRACE_NAMES:,} files")
            padded = (low.lstrip("-").startswith("0") and len(low.lstrip("-")) > 1) or (
                high.lstrip("-").startswith("0") and len(high.lstrip("-")) > 1)
            width = max(len(low), len(high)) if padded else 0
            step = 1 if stop >= start else -1
            return [f"{head}{n:0{width}d}{tail}" for n in range(start, stop + step, step)]
        if "," in body:
            return [f"{head}{choice}{tail}" for choice in body.split(",")]
    return None
