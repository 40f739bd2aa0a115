"""Durable, atomic writes into a folder that several runs share (the shards of a job array, a run and the
engine worker processes it started): each file is written under a temporary name that carries its owner,
fsynced, then renamed (or hard-linked) into place, and the folder is fsynced after the rename. A run removes
only the temporaries of runs that are gone, never a sibling's file in the middle of its write.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Owner:
    """Who writes a file into an output folder: a run (its id, which also starts its part names), and the host
    and process writing. Temporary files carry their owner in their name, so a run that starts beside others
    removes only the temporaries of runs that are gone, never a sibling's file in the middle of its write."""

    run: str
    host: str
    pid: int

    @classmethod
    def new(cls) -> Owner:
        """A new run, in this process."""
        run = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        return cls(run, _host_name(), os.getpid())

    def here(self) -> Owner:
        """The same run, in this process (an engine worker process of the run)."""
        return replace(self, host=_host_name(), pid=os.getpid())

    def temp(self, final: Path) -> Path:
        """The temporary name `final` is written under before it is renamed into place."""
        return final.with_name(f"{TMP_PREFIX}{self.run}~{self.pid}~{self.host}~{final.name}")


_TEMP_NAME = re.compile(r"\.tmp-(?P<run>[^~]+)~(?P<pid>\d+)~(?P<host>[^~]*)~.+")


def _host_name() -> str:
    """This host's name, as it can stand in a file name (no `~`, `/` or control characters)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "unknown"


def temp_owner(path: Path) -> str | None:
    """The run id a temporary file's name carries; None for one written by a batchvl that did not name owners."""
    m = _TEMP_NAME.fullmatch(path.name)
    return m.group("run") if m else None


def temp_files(out_dir: Path) -> list[Path]:
    """Every temporary file in the folder (parts and `_` files not yet renamed into place), whoever wrote it."""
    return sorted(out_dir.glob(TMP_PREFIX + "*")) if out_dir.is_dir() else []


ORPHAN_AGE_S = 60.0  # a temporary file of no live run, untouched this long, is a leftover wherever it came from


def remove_dead_temps(out_dir: Path, live_runs: Iterable[str]) -> int:
    """Remove the temporary files that runs which are gone left behind (killed before renaming them, so never
    part of the output). A file stays if its run is in `live_runs` (the runs holding a lease of the folder),
    or if it is younger than ORPHAN_AGE_S and its process may still be alive: a run that has just started
    writes its lease file under a temporary name before it holds the lease. Returns how many were removed."""
    live = set(live_runs)
    removed = 0
    now = time.time()
    for path in temp_files(out_dir):
        m = _TEMP_NAME.fullmatch(path.name)
        if m is not None and m.group("run") in live:
            continue
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        writer_gone = m is None or (m.group("host") == _host_name() and not process_alive(int(m.group("pid"))))
        if writer_gone or age >= ORPHAN_AGE_S:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks after boot (Linux); None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` of this machine exists; with `started` (its `process_start`), whether it is still
    that process and not a later one that was given the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    now = process_start(pid) if started is not None else None
    return started is None or now is None or now == started


def write_json_atomic(path: Path, value: Any, owner: Owner) -> None:
    """Write JSON to `path` through `owner`'s temporary file, fsync and rename (then fsync the folder, so that the
    rename survives a power loss): readers see the old or the new file."""
    tmp = _write_json_temp(path, value, owner)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def create_json_once(path: Path, value: Any, owner: Owner) -> bool:
    """Create `path` holding `value` unless it exists: True if this call created it. Of several processes (on
    several hosts of a network filesystem) racing to create it, exactly one does, and no reader sees it half
    written: it is written whole under a temporary name, then hard-linked into place, which fails if the name
    exists. (Where the filesystem has no hard links, an exclusive create, then the write.)"""
    data = json.dumps(value, indent=2, sort_keys=True) + "\n"
    for _ in range(3):  # a run clearing the folder may remove our temporary before the link: write it again
        tmp = _write_json_temp(path, value, owner)
        try:
            os.link(tmp, path)
            created = True
            break
        except FileExistsError:
            created = False
            break
        except FileNotFoundError:
            continue
        except OSError:  # no hard links here (some FUSE and object-store filesystems)
            created = _create_exclusive(path, data.encode())
            break
        finally:
            tmp.unlink(missing_ok=True)
    else:
        created = _create_exclusive(path, data.encode())
    if created:
        fsync_dir(path.parent)
    return created


def _create_exclusive(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _write_json_temp(path: Path, value: Any, owner: Owner) -> Path:
    tmp = owner.temp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_table_atomic(table: pa.Table, path: Path, owner: Owner) -> None:
    tmp = owner.temp(path)
    with open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes_atomic(data: bytes, path: Path, owner: Owner) -> None:
    tmp = owner.temp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make the renames in a folder durable (a power loss after a rename without it can lose the rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
