"""A folder (or glob) of images and videos as the input: each media file is a row, with no data file.

A row's id is the file's path below the input's root (`cats/001.jpg`), its columns `image` (or `video`: the
file's absolute path, which the media stage reads) and `path` (the id again, for `{path}` in the prompt or
output.keep_columns). The job's `prompt` is every row's. A folder is walked as it is read, each directory's
entries in name order: memory holds one directory's names, not the whole tree's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from batchvl.config.spec import VIDEO_SUFFIXES, is_media_file
from batchvl.io.text import Record

MEDIA_COLUMNS = ("image", "video", "path")


def media_files(path: Path) -> Iterator[Path]:
    """The media files of an input entry: the file itself, or those under a folder, depth first, by name."""
    if not path.is_dir():
        yield path
        return
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return  # a folder that cannot be listed (permissions): nothing of it can be read
    for entry in entries:
        try:
            if entry.is_dir():
                yield from media_files(Path(entry.path))
            elif entry.is_file() and is_media_file(Path(entry.name)):
                yield Path(entry.path)
        except OSError:
            continue


def read_media(path: Path, name_of: Callable[[Path], str]) -> Iterator[Record]:
    """One record per media file of the entry, named by `name_of` (its path below the input's root)."""
    for file in media_files(path):
        name = name_of(file)
        video = file.name.lower().endswith(VIDEO_SUFFIXES)
        data = {"image": None if video else str(file), "video": str(file) if video else None, "path": name}
        yield name, data, None, None


def count_media(path: Path) -> int:
    return sum(1 for _ in media_files(path))
