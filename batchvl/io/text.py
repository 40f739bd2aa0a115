"""What every input reader shares: the record it yields, opening an input file, and errors shown on one line."""

from __future__ import annotations

from typing import IO, Any

from batchvl.config.urls import InputFile, RemoteFile

# (source, data, error, key): key is the id column's value when it could be read but the record could not
Record = tuple[str, dict | None, str | None, Any]


def one_line(error: BaseException) -> str:
    """An exception's message on one printable line, at most 500 characters."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(error)[:2000]).split())[:500]


def open_input(file: InputFile) -> IO[bytes]:
    """An input file's bytes, read as they are asked for: a local file, or one named by an fsspec URL (read
    through `fsspec.open`, block by block as its filesystem buffers it; never fetched whole up front)."""
    if isinstance(file, RemoteFile):
        import fsspec

        return fsspec.open(file.url, "rb").open()
    return open(file, "rb")
