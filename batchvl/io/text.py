"""What every input reader shares: the record it yields, and errors shown on one line."""

from __future__ import annotations

from typing import Any

# (source, data, error, key): key is the id column's value when it could be read but the record could not
Record = tuple[str, dict | None, str | None, Any]


def one_line(error: BaseException) -> str:
    """An exception's message on one printable line, at most 500 characters."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(error)[:2000]).split())[:500]
