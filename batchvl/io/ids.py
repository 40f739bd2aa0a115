"""What a row's id is (README "Row ids"). A rerun skips the ids already in the output folder, so an id must not change
between runs while its row does not.

With `input.id_column`, the id is the column's value as text (`id_text`): a string as it is, an integer as its
decimal digits, bytes as their UTF-8 text; any other value (a float, a boolean, a list, a date...) cannot be an id,
and its row becomes an error row. Without it, or for a record whose id cannot be read, it is the record's position,
`<file>:<line>` (JSONL, 1-based), `<file>:<row>` (Parquet and Arrow, 0-based), `<file>:<record>` (CSV, 1-based),
`<shard>:<key>` (WebDataset) or the media file's own path (a media folder), with the file named by its path below
`InputSpec.root`, a folder fixed by `input.path` alone: adding files to the input never renames the others. A file
read through an fsspec URL is named the same way, below the URL's folder (config.urls), so it keeps the ids the
same file has read from a local path.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import pyarrow as pa

from batchvl.config.spec import INPUT_SUFFIXES, InputFile, Job, RemoteFile, shown

# The rule of `id_text`, recorded in an output folder's fingerprint (`input.ids`). A folder whose fingerprint
# lacks it was written by a batchvl that made any value an id with str(); it keeps doing so (`old_values`).
ID_RULE = "text: str, int as decimal, bytes as UTF-8"
_WHAT_IDS_ARE = "an id is a string, an integer or UTF-8 bytes"


@dataclass(frozen=True)
class Ids:
    """How a run names its rows: files by their path below `root`; records by their `column` value, as
    `id_text` makes it, or as str() did for a folder written before that rule (`old_values`)."""

    root: PurePath
    column: str | None = None
    old_values: bool = False
    format: str = "auto"  # input.format: which reader gives the records (an OpenAI batch's id is its custom_id)

    @classmethod
    def of(cls, job: Job, old_values: bool = False) -> Ids:
        return cls(job.input.root, job.input.id_column, old_values, job.input.format)

    def name(self, file: InputFile) -> str:
        """The file's part of its rows' default ids: its path below the root, with `/` between folders."""
        if isinstance(file, RemoteFile):
            return utf8_safe(file.below)
        return utf8_safe(PurePath(os.path.relpath(file, self.root)).as_posix())

    def text(self, value: Any) -> str:
        """The id of a record whose id column holds `value` (not None). ValueError when it cannot be one."""
        if self.old_values:
            return utf8_safe(value if isinstance(value, str) else str(value))
        return id_text(value)


def id_text(value: Any) -> str:
    """An id column's value (not None) as the row's id. ValueError saying why for a value that cannot be one.

    A string is used as it is (a lone surrogate as its backslash escape) and an integer as its decimal digits,
    so the int 1 and the string "1" are one id: the later row is a duplicate. Bytes (a Parquet binary column)
    are their UTF-8 text. Anything else is refused rather than guessed at: a float (JSON has one kind of number,
    so 1 and 1.0 would be two ids for one value; above 2^53 a float cannot tell neighbouring integers apart,
    and a float id column is most often an integer column that a missing value turned into floats), a
    boolean, a list or an object, a date or a decimal, and bytes that are not UTF-8."""
    if isinstance(value, str):
        return utf8_safe(value)
    if isinstance(value, bool):
        raise ValueError(f"a boolean ({value}); {_WHAT_IDS_ARE}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"bytes that are not UTF-8 text ({shown(data)}: byte {e.start} is invalid); "
                             f"{_WHAT_IDS_ARE}") from None
    kind = {float: "a float", list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")
    raise ValueError(f"{kind} ({shown(value)}); {_WHAT_IDS_ARE}")


def id_type_problem(type_: pa.DataType) -> str | None:
    """Why a Parquet column of this type cannot be an id column (every value would be refused), or None."""
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    fits = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_binary,
            pa.types.is_large_binary, pa.types.is_fixed_size_binary, pa.types.is_null,
            getattr(pa.types, "is_string_view", None), getattr(pa.types, "is_binary_view", None))
    if any(check is not None and check(type_) for check in fits):
        return None
    return f"its values are {type_}: {_WHAT_IDS_ARE}"


def utf8_safe(text: str) -> str:
    """`text`, with anything UTF-8 cannot encode (lone surrogates) as backslash escapes."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def moved_folder(done: Iterable[str], names: Iterable[str], root: PurePath) -> tuple[str, str, PurePath] | None:
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
