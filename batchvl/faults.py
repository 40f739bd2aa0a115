"""Fault injection for the crash and concurrency tests, reachable from every layer (it imports nothing of
batchvl): `BATCHVL_FAULT=kill:<point>:<n>` SIGKILLs this process at the n-th time it reaches `<point>` (1-based);
`sleep:<point>:<n>:<seconds>` stalls it there that long (a slow disk, a slow batch: what a concurrent run sees
meanwhile). Points: `read` (after reading n input rows), `batch` (before the n-th engine batch), `write` (after
the n-th part's temporary file is written and fsynced, before its rename), `tile` (in a media worker process,
batchvl.media.pool, once it has tiled its n-th item, before it answers; each new worker counts from 1). A spec
ending in `@<worker>` fires only in that engine worker process (`cpu1`, `gpu3`: see batchvl.run.worker); without
`@`, in any process that reaches the point. Unset (the normal case), `fault_point` costs one dict lookup."""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "BATCHVL_FAULT"
POINTS = ("read", "batch", "write", "tile")

_counts: dict[str, int] = {}
_lock = threading.Lock()
_process = ""  # this process's worker label; empty in the main process


def set_process_label(label: str) -> None:
    """Name this process for `@<worker>` fault specs (called once by each engine worker)."""
    global _process
    _process = label


def _spec() -> tuple[str, str, int, float, str | None] | None:
    text = os.environ.get(ENV)
    if not text:
        return None
    spec, at, where = text.partition("@")
    action, point, n, *rest = spec.split(":") if spec.count(":") >= 2 else ("", "", "")
    seconds = rest[0] if rest else "0"
    ok = point in POINTS and n.isdigit() and int(n) >= 1 and not (at and not where) and (
        (action == "kill" and not rest) or (action == "sleep" and len(rest) == 1 and _is_number(seconds)))
    if not ok:
        raise ValueError(f"{ENV}: expected kill:<{'|'.join(POINTS)}>:<n> or sleep:<point>:<n>:<seconds>, "
                         f"optionally followed by @<worker>, got {text!r}")
    return action, point, int(n), float(seconds), where or None


def _is_number(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


def fault_point(name: str) -> None:
    """Mark that the process reached point `name`; kill it (or stall it) here if BATCHVL_FAULT asks for this
    one."""
    spec = _spec()
    if spec is None or spec[1] != name or spec[4] not in (None, _process):
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == spec[2]
    if hit and spec[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif hit:
        time.sleep(spec[3])
