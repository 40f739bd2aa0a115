"""What a row's id is (README "Row ids"). A rerun skips the ids already in the output folder, so an id must
not change between runs while its row does not.

With `input.id_column`, the id is the column's value. Without it, or for a record whose id cannot be read, it
is the record's position, `<file>:<line>` (JSONL, 1-based) or `<file>:<row>` (Parquet, 0-based), with the file
named by its path below `InputSpec.root`, a folder fixed by `input.path` alone: adding files to the input
never renames the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from batchvl.config.spec import INPUT_SUFFIXES, Job


@dataclass(frozen=True)
class Ids:
    """How a run names its rows: files by their path below `root`; records by their `column` value."""

    root: Path
    column: str | None = None

    @classmethod
    def of(cls, job: Job) -> Ids:
        return cls(job.input.root, job.input.id_column)

    def name(self, file: Path) -> str:
        """The file's part of its rows' default ids: its path below the root, with `/` between folders."""
        return utf8_safe(PurePath(os.path.relpath(file, self.root)).as_posix())

    def text(self, value: Any) -> str:
        """The id of a record whose id column holds `value` (not None). ValueError when it cannot be one."""
        return utf8_safe(value if isinstance(value, str) else str(value))


def utf8_safe(text: str) -> str:
    """`text`, with anything UTF-8 cannot encode (lone surrogates) as backslash escapes."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def moved_folder(done: Iterable[str], names: Iterable[str], root: Path) -> tuple[str, str, Path] | None:
    """Whether the output folder's ids name input files relative to another folder than `root`: an id names
    `a.jsonl` where the input has `x/a.jsonl` (or the other way round). Then those rows would run again under
    their new ids. Returns (the name in the ids, the input's name for it, the folder the ids are relative to),
    or None.

    That happens when `input.path` now names another folder, or for a folder written by a batchvl that named
    files relative to the folder holding all input files (which moved when files were added)."""
    names = set(names)
    shorter: dict[str, str] = {}  # every tail of an input file's path: "a.jsonl" -> "x/a.jsonl"
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            shorter.setdefault("/".join(parts[i:]), name)
    looked: set[str] = set()
    for row_id in done:
        old, _, number = row_id.rpartition(":")
        if old in names or not old.endswith(INPUT_SUFFIXES) or not number.isdigit():
            continue  # the common case first: a position in a file of the input, or an id of the id column
        old = old.rpartition("#dup@")[2]  # a duplicate's key ends with its position
        if old in names or old in looked:
            continue
        looked.add(old)
        if old in shorter:  # relative to a folder below the root
            new = shorter[old]
            return old, new, root / new[: -len(old) - 1]
        parts = old.split("/")
        for i in range(1, len(parts)):  # relative to a folder above the root, which ends with the extra part
            if "/".join(parts[i:]) in names and root.parts[len(root.parts) - i:] == tuple(parts[:i]):
                return old, "/".join(parts[i:]), root.parents[i - 1]
    return None
