"""`batchvl status OUT/`: how far an output folder is, per shard, and whether the runs it names are alive.

A summary file says `running` while its run writes and something else once it ends; a run killed with SIGKILL
(or by a lost machine) never gets to change it. The folder's lease files tell the two apart: a live run holds
one and renews its heartbeat, a dead one does not.
"""

from __future__ import annotations

import time
from pathlib import Path

from batchvl.errors import DamagedPartError
from batchvl.io.lease import STALE_S, Holder, holders, liveness
from batchvl.io.shards import shard_status
from batchvl.io.writer import error_kind, part_files, part_index
from batchvl.run.summary import FolderRows


def folder_status(out: Path) -> list[str]:
    """The lines `batchvl status` prints."""
    rows, damaged, errors = 0, [], FolderRows()
    parts = part_files(out)
    for p in parts:
        try:
            ids, row_errors, _ = part_index(p)
        except (DamagedPartError, OSError, ValueError) as e:
            damaged.append(f"{p.name} ({' '.join(str(getattr(e, 'reason', e)).split())[:120]})")
            continue
        rows += len(ids)
        for row_id, error in zip(ids, row_errors, strict=True):
            if error is not None:
                kind = error_kind(error)
                errors.failed[kind] = errors.failed.get(kind, 0) + 1
                errors.examples.setdefault(kind, row_id)
    failed = sum(errors.failed.values())
    lines = [f"{out}: {rows} rows in {len(parts) - len(damaged)} part file(s)" + (f", {failed} failed:" if failed
                                                                                   else ", none failed")]
    lines += errors.error_lines()
    if damaged:
        lines.append(f"damaged part files, not counted (`batchvl repair {out}` moves them aside): {'; '.join(damaged)}")
    leases = {h.run: h for h in holders(out).values() if h is not None}
    shown = set()
    for s in shard_status(out):
        state, run = s.get("state"), s.get("run")
        holder = leases.get(run) if run else None
        if holder is not None:
            shown.add(run)
        state = _state(state, holder)
        if "shard" in s:
            total, done = s.get("rows_in_shard", 0), s.get("rows_done_in_shard", 0)
            pct = 100.0 * done / total if total else 100.0
            lines.append(f"shard {s['shard']}: {done}/{total} rows ({pct:.1f}%), {state}, updated {s.get('updated')}")
        else:
            lines.append(f"unsharded runs: {s.get('rows_ok', 0)} ok, {s.get('rows_failed', 0)} failed, {state}, "
                         f"updated {s.get('updated')}")
    for run, holder in leases.items():
        if run not in shown and not holder.mutex:  # started, nothing committed yet
            lines.append(f"{holder.scope.label}: nothing committed yet, {_state('running', holder)}")
    return lines


def _state(state: str | None, holder: Holder | None) -> str:
    """A summary's state, checked against the lease of its run."""
    if state != "running":
        return str(state)
    if holder is None:
        return f"{state} when last updated, but no run holds the folder: it was killed; rerun to resume"
    alive = liveness(holder)
    who = f"run {holder.run}, host {holder.host}, pid {holder.pid}"
    if alive == "alive":
        return f"{state} ({who})"
    if alive == "dead":
        return f"dead ({who} is gone: killed); rerun to resume"
    age = time.time() - holder.updated
    return (f"{state}? ({who} on another machine has not renewed its lease for {age:.0f} s; a rerun takes it over "
            f"once it has been still for {STALE_S:.0f} s)")
