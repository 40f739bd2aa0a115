"""`batchvl repair OUT/`: move the part files that cannot be read out of the way, so that a rerun runs their rows.

A committed part is written whole (temporary file, fsync, rename, fsync of the folder), but a failing disk, a
copy interrupted by hand or a tool can still truncate or zero one afterwards. Such a part stops every run on
the folder (io.writer.check_part). `repair` reads every part whole; each one that fails is moved to
`OUT/_damaged/`, where readers do not look, and its rows are then simply not done: the next run of the job runs
them again, each id once. It holds the folder's lease while it works, so it is refused while a run writes the
folder (see batchvl.io.lease).
"""

from __future__ import annotations

from pathlib import Path

from batchvl.errors import DamagedPartError, JobError
from batchvl.io.durable import Owner
from batchvl.io.lease import Lease, Scope
from batchvl.io.writer import check_part, fsync_dir, part_files

DAMAGED_DIR = "_damaged"


def damaged_parts(out_dir: Path) -> list[tuple[Path, str]]:
    """(part, why) for every part file of `out_dir` that cannot be read whole."""
    found = []
    for part in part_files(out_dir):
        try:
            check_part(part)
        except DamagedPartError as e:
            found.append((part, e.reason))
    return found


def move_damaged_parts(out_dir: Path) -> list[tuple[Path, str]]:
    """Move every part file that cannot be read to `out_dir/_damaged/`; returns (where it went, why)."""
    if not out_dir.is_dir():
        raise JobError(f"repair: no such output folder: {out_dir}")
    with Lease(out_dir, Scope(0, 1, exclusive=True), Owner.new()):
        return _move(out_dir)


def _move(out_dir: Path) -> list[tuple[Path, str]]:
    moved = []
    for part, why in damaged_parts(out_dir):
        aside = out_dir / DAMAGED_DIR
        aside.mkdir(exist_ok=True)
        target = aside / part.name
        part.replace(target)
        moved.append((target, why))
    if moved:  # the moves survive a power loss
        fsync_dir(out_dir / DAMAGED_DIR)
        fsync_dir(out_dir)
    return moved
