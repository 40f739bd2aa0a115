"""WebDataset shards: `.tar` files whose consecutive members sharing a key (the member's path up to the first
dot of its file name: `a/001.jpg` and `a/001.json` are sample `a/001`) make one sample, one row.

A sample's columns are its members' extensions: `txt` (and `text`) as a string, `json` parsed (an object's
keys are columns too, unless a member's extension took the name), `cls` (and `cls2`, `index`) as an integer
where the text is one, anything else as its bytes. The first image member is also `image`, the first video
member `video`, so a job's image_column and video_column default to those. A row's id is `<shard>:<key>`.

Read with tarfile, member by member: memory holds one sample. A `.tar.gz` or `.tgz` shard is decompressed as
it is read (gzip under the same reader: still one sample in memory; counting its samples is a pass through the
gzip stream). A member larger than MAX_MEMBER_BYTES is not read, and its sample becomes an error row, as does
one whose json member does not parse; a shard cut short ends with one error row for what cannot be read. A shard
named by an fsspec URL is read the same way, through its fsspec file. (The webdataset package reads the same
layout; this reader was the faster on the measurement in README "Input formats", and it turns a bad sample into
an error row where webdataset's readers raise.)
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from batchvl.config.spec import IMAGE_SUFFIXES, VIDEO_SUFFIXES, InputFile
from batchvl.io.text import Record, one_line, open_input

MAX_MEMBER_BYTES = 512 * 1024 * 1024
COLUMN_SCAN = 100  # samples looked at when checking that a column exists
_TEXT = ("txt", "text")
_INTEGER = ("cls", "cls2", "index")
_IMAGE = tuple(s[1:] for s in IMAGE_SUFFIXES) + ("ppm",)
_VIDEO = tuple(s[1:] for s in VIDEO_SUFFIXES)
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)  # zlib: a corrupt .tar.gz


def split_name(path: str) -> tuple[str, str]:
    """(key, extension) of a member's path: the extension is everything after the first dot of the file name."""
    folder, _, base = path.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The regular-file members, forgetting each once passed (TarFile keeps a list of all it has seen)."""
    while True:
        member = tar.next()
        if member is None:
            return
        tar.members.clear()
        if member.isfile():
            yield member


@contextmanager
def open_shard(path: InputFile) -> Iterator[tarfile.TarFile]:
    """A shard for reading member by member, read through open_input (a local file or an fsspec URL); gzip
    compressed (`.tar.gz`, `.tgz`) decompressed as it is read. Tar's own errors are raised as read."""
    gzipped = path.name.lower().endswith((".tar.gz", ".tgz"))
    with open_input(path) as raw, tarfile.open(fileobj=raw, mode="r:gz" if gzipped else "r:") as tar:
        yield tar


def read_shard(path: InputFile, name: str) -> Iterator[Record]:
    """The samples of one shard, as records (see the module's docstring)."""
    key, members, problem = None, {}, None
    offset = 0
    try:
        with open_shard(path) as tar:
            for member in _members(tar):
                offset = member.offset
                member_key, ext = split_name(member.name)
                if not ext:
                    continue
                if member_key != key:
                    if key is not None:
                        yield _sample(name, key, members, problem)
                    key, members, problem = member_key, {}, None
                if member.size > MAX_MEMBER_BYTES:
                    problem = problem or f"its member {ext} has {member.size} bytes, more than {MAX_MEMBER_BYTES}"
                    continue
                if ext not in members:  # a second member of one extension is the same column: the first stays
                    members[ext] = tar.extractfile(member).read()
    except _TAR_ERRORS as e:
        where = f"{name}:{key}" if key is not None else f"{name}:@{offset}"
        yield where, None, (f"input: record {where} and the rest of {name} cannot be read (the shard is cut short "
                            f"or corrupt): {one_line(e)}"), None
        return
    if key is not None:
        yield _sample(name, key, members, problem)


def _sample(name: str, key: str, members: dict[str, bytes], problem: str | None) -> Record:
    source = f"{name}:{key}"
    if problem is not None:
        return source, None, f"input: record {source} {problem}", None
    data: dict[str, Any] = {"__key__": key}
    for ext, raw in members.items():
        if ext in _TEXT:
            data[ext] = raw.decode("utf-8", "backslashreplace")
        elif ext in _INTEGER:
            text = raw.decode("utf-8", "backslashreplace").strip()
            data[ext] = int(text) if text.lstrip("-").isdigit() and len(text) < 20 else text
        elif ext == "json":
            try:
                data[ext] = json.loads(raw)
            except (ValueError, RecursionError) as e:
                return source, None, f"input: record {source} has a json member that is not JSON: {one_line(e)}", None
        else:
            data[ext] = raw
            if ext.rpartition(".")[2] in _IMAGE:
                data.setdefault("image", raw)
            elif ext.rpartition(".")[2] in _VIDEO:
                data.setdefault("video", raw)
    if isinstance(data.get("json"), dict):
        for column, value in data["json"].items():
            data.setdefault(column, value)
    data.setdefault("image", None)
    data.setdefault("video", None)
    return source, data, None, None


def count_samples(path: InputFile) -> int:
    """The samples of a shard (as many as `read_shard` gives records), from its member headers alone."""
    count, key = 0, None
    try:
        with open_shard(path) as tar:
            for member in _members(tar):
                member_key, ext = split_name(member.name)
                if ext and member_key != key:
                    count, key = count + 1, member_key
    except _TAR_ERRORS:  # the sample being read becomes the error row; with none begun, one error row of its own
        count = max(count, 1)
    return count


def shard_columns(path: InputFile, scan: int) -> set[str] | None:
    """The columns of the shard's first samples (at most min(scan, COLUMN_SCAN)); None for an empty shard."""
    seen: set[str] = set()
    looked = 0
    for _, data, _, _ in read_shard(path, ""):
        looked += 1
        seen.update(data or ())
        if looked >= min(scan, COLUMN_SCAN):
            break
    return seen if looked else None
