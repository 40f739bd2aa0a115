"""Small helpers of the job-file checks: a value's range, how an error message quotes it, and paths."""

from __future__ import annotations

import os
import reprlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from batchvl.errors import JobError, JobErrors

T = TypeVar("T")


class Problems:
    """The problems of a job file, collected so that all of them are reported at once, not only the first:
    each check runs under `check()` (or through `run`), and `raise_any()` raises what they found."""

    def __init__(self) -> None:
        self.errors: list[JobError] = []

    def add(self, message: str) -> None:
        self.errors.append(JobError(message))

    @contextmanager
    def check(self) -> Iterator[None]:
        """Run the block; a JobError it raises is kept, not raised."""
        try:
            yield
        except JobErrors as e:
            self.errors.extend(JobError(m) for m in e.messages)
        except JobError as e:
            self.errors.append(e)

    def run(self, check: Callable[..., T], *args: Any) -> T | None:
        """`check(*args)`, its JobError kept; None when it raised one."""
        with self.check():
            return check(*args)
        return None

    def raise_any(self) -> None:
        """Raise what was found: the one JobError as it was raised, or JobErrors for several, in the order found
        (a message found twice, say for each input file, once)."""
        messages = list(dict.fromkeys(str(e) for e in self.errors))
        if len(messages) == 1:
            raise self.errors[0]
        if messages:
            raise JobErrors(messages)


def one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise JobError(f"{key}: must be one of {', '.join(choices)}; got {shown(value)}")


def at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise JobError(f"{key}: must be >= {low}, got {shown(value, quote=False)}")


def at_most(key: str, value: int | float, high: int | float) -> None:
    if value > high:
        raise JobError(f"{key}: must be <= {high:,}, got {shown(value, quote=False)}")


SHOWN_CHARS = 100  # an error message quotes at most this much of a value
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, SHOWN_CHARS, SHOWN_CHARS, 40


def shown(value: Any, quote: bool = True) -> str:
    """`value` as an error message quotes it: its repr (a string's own text when `quote` is false), on one line
    and cut to SHOWN_CHARS with `...`, however large the value is (reprlib never builds the whole repr)."""
    if isinstance(value, str):
        cut = value[:SHOWN_CHARS]
        if quote:
            text = repr(cut)
        else:  # the plain text, with any control character (a newline) escaped
            text = cut if cut.isprintable() else repr(cut)[1:-1]
        more = len(value) > SHOWN_CHARS
    else:
        text = _REPR.repr(value)
        more = len(text) > SHOWN_CHARS
        text = text[:SHOWN_CHARS]
    return text + "..." if more else text


def path_is(path: Path, kind: str) -> bool:
    """`path.is_file()` / `is_dir()` / `exists()` (`kind`), False where the name cannot be a path at all (too
    long, a NUL byte) instead of an OSError or ValueError from the operating system."""
    try:
        return getattr(path, kind)()
    except (OSError, ValueError):
        return False


def absolute_path(path: str, base_dir: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else Path(base_dir) / p
