"""Fault injection for the crash tests: `BATCHVL_FAULT=kill:<point>:<n>` SIGKILLs this process at the n-th
time it reaches `<point>` (1-based). Points: `read` (after reading n input rows), `batch` (before the n-th
engine batch), `write` (after the n-th part's temporary file is written and fsynced, before its rename).
`kill:<point>:<n>@<worker>` fires only in that engine worker process (`cpu1`, `gpu3`: see batchvl.run.worker);
without `@`, in any process that reaches the point. Unset (the normal case), `fault_point` costs one dict
lookup."""

from __future__ import annotations

import os
import signal
import threading

ENV = "BATCHVL_FAULT"
POINTS = ("read", "batch", "write")

_counts: dict[str, int] = {}
_lock = threading.Lock()
_process = ""  # this process's worker label; empty in the main process


def set_process_label(label: str) -> None:
    """Name this process for `@<worker>` fault specs (called once by each engine worker)."""
    global _process
    _process = label


def _spec() -> tuple[str, int, str | None] | None:
    text = os.environ.get(ENV)
    if not text:
        return None
    spec, at, where = text.partition("@")
    action, _, rest = spec.partition(":")
    point, _, n = rest.partition(":")
    if action != "kill" or point not in POINTS or not n.isdigit() or int(n) < 1 or (at and not where):
        raise ValueError(f"{ENV}: expected kill:<{'|'.join(POINTS)}>:<n>[@<worker>], got {text!r}")
    return point, int(n), where or None


def fault_point(name: str) -> None:
    """Mark that the process reached point `name`; kill it here if BATCHVL_FAULT asks for this one."""
    spec = _spec()
    if spec is None or spec[0] != name or spec[2] not in (None, _process):
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == spec[1]
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
