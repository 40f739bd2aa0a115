"""One writer per output folder, or per shard of it: a lease file that names its holder.

A run holds `_lock.json` (an unsharded run) or `_lock-shard-I-of-N.json` (`--shard I/N`) for as long as it
writes. The file names the holder (run id, host, process and when it started). It is created whole under a
temporary name and hard-linked into place, which fails if the name exists: that works on network filesystems
(NFS, Lustre), where an fcntl lock alone is not reliable. The lease file is never written again: its holder's
heartbeat, renewed by a thread every `HEARTBEAT_S`, goes to a file of its own beside it (`beat_file`). A beat
that rewrote the lease file could land just after another run took the lease over (the beat's read and its
write are two steps), putting the old holder's name back over the new one's: both would then pass the check
before a commit. A beat file names only its own run, so a late beat changes nobody's lease. (A lease written
by a batchvl from before this holds its beat inside, and is read so.)

Another run of the same folder or shard is refused, naming the holder, or waits (`--wait`). Runs that would
write the same rows at once are refused the same way: an unsharded run beside any shard, shards of different
counts, and a run that rewrites or clears the folder (`--overwrite`, `--retry-errors`) beside any other run.

A lease whose holder is gone is taken over:
- on the same machine (same host name, boot and process namespace), at once, when its process no longer
  exists (or its pid now belongs to a newer process);
- from another machine, when its heartbeat has not changed for `STALE_S` by our own clock. The file's own
  timestamp only decides whether to start watching, so clocks that disagree between hosts cannot make a live
  lease look dead.
The takeover renames the stale file aside and checks that it moved the lease it judged, so two runs taking
over at once cannot both win. Before each part is committed the holder checks that the lease still names it
(`Lease.check`): a run that lost its lease (frozen past `STALE_S`, then taken over) stops instead of writing.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shlex
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from batchvl.errors import JobError, OutputWriteError
from batchvl.io.durable import Owner, create_json_once, fsync_dir, process_alive, process_start, write_json_atomic

log = logging.getLogger(__name__)

LEASE_GLOB = "_lock*.json"
HEARTBEAT_S = 5.0  # how often the holder renews its lease
STALE_S = 30.0  # a lease from another machine unchanged this long (by our clock) is stale
WAIT_POLL_S = 1.0  # with --wait, how often the lease is looked at again


@dataclass(frozen=True)
class Scope:
    """What a run writes: the shard `index` of `count` (an unsharded run is 0 of 1), and whether it rewrites
    the folder (`exclusive`: --overwrite, --retry-errors), which no other run may do at the same time. A scope
    with a `mutex` name is not a run's but a short critical section's (REWRITE), which clashes only with itself."""

    index: int = 0
    count: int = 1
    exclusive: bool = False
    mutex: str = ""

    @property
    def file_name(self) -> str:
        if self.mutex:
            return f"_lock-{self.mutex}.json"
        return "_lock.json" if self.count == 1 else f"_lock-shard-{self.index}-of-{self.count}.json"

    @property
    def label(self) -> str:
        if self.mutex:
            return f"{self.mutex} of part files"
        return "unsharded" if self.count == 1 else f"shard {self.index}/{self.count}"

    def clashes(self, other: Scope) -> bool:
        """Whether runs of the two scopes could write the same rows, or one rewrites what the other reads."""
        if self.mutex or other.mutex:
            return self.mutex == other.mutex
        return self.exclusive or other.exclusive or self.count != other.count or self.index == other.index


REWRITE = Scope(mutex="rewrite")  # held while a run that shares the folder rewrites part files


@dataclass(frozen=True)
class Holder:
    """A lease file's content."""

    run: str
    host: str
    pid: int
    machine: str  # host name, boot id and pid namespace: equal only for processes that see the same pids
    pid_start: str | None  # the process's start time (Linux), so a reused pid is not taken for the holder
    index: int
    count: int
    exclusive: bool
    started: str
    beat: int
    updated: float  # the holder's wall clock at its last heartbeat (informative across hosts)
    command: str
    mutex: str = ""

    @property
    def scope(self) -> Scope:
        return Scope(self.index, self.count, self.exclusive, self.mutex)

    def describe(self) -> str:
        age = max(0.0, time.time() - self.updated)
        what = " (--overwrite or --retry-errors)" if self.exclusive else ""
        return (f"run {self.run} ({self.scope.label}{what}, host {self.host}, pid {self.pid}, started "
                f"{self.started}, last heartbeat {age:.0f} s ago)")


def read_holder(path: Path) -> Holder | None:
    """The holder a lease file names, with its latest heartbeat (from its beat file, when it has one); None if
    the lease file is gone, or not (yet) readable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        holder = Holder(**{k: data[k] for k in Holder.__dataclass_fields__ if k in data})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        beat = json.loads(beat_file(path, holder.run).read_text(encoding="utf-8"))
        if beat["run"] == holder.run:
            holder = replace(holder, beat=int(beat["beat"]), updated=float(beat["updated"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no beat yet (or an older batchvl's lease): the lease file's own values
    return holder


def beat_file(lease_file: Path, run: str) -> Path:
    """Where `run`, holding `lease_file`, writes its heartbeat: `_beat-lock-<run>.json` beside `_lock.json` (not
    matched by LEASE_GLOB)."""
    return lease_file.with_name(f"_beat-{lease_file.stem.lstrip('_')}-{run}.json")


def holders(out_dir: Path) -> dict[Path, Holder | None]:
    """Every lease file of the folder and its holder (None where it cannot be read)."""
    return {p: read_holder(p) for p in sorted(out_dir.glob(LEASE_GLOB))} if out_dir.is_dir() else {}


def remove_orphan_beats(out_dir: Path) -> int:
    """Remove the beat files of runs that hold no lease of the folder (a run killed between removing its lease
    and its beat file, or an old holder's beat written after a takeover). Returns how many were removed."""
    keep = {beat_file(path, h.run) for path, h in holders(out_dir).items() if h is not None}
    removed = 0
    for path in out_dir.glob("_beat-*.json"):
        if path not in keep:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def liveness(holder: Holder) -> str:
    """`alive`, `dead` (same machine, its process is gone) or `unknown` (another machine: only its heartbeat
    can tell, see `Lease`). Looks once, without waiting."""
    if holder.machine != machine_id():
        return "alive" if time.time() - holder.updated < STALE_S else "unknown"
    return "alive" if process_alive(holder.pid, holder.pid_start) else "dead"


def live_runs(out_dir: Path) -> set[str]:
    """The runs holding a lease of the folder that are not known to be dead: their temporary files stay."""
    return {h.run for h in holders(out_dir).values() if h is not None and liveness(h) != "dead"}


class Lease:
    """The lease of `scope` in `out_dir`, for `owner`. `acquire()` takes it (or raises JobError naming the
    holder; with `wait`, waits for it), starts the heartbeat, and `release()` gives it back. A context manager."""

    def __init__(self, out_dir: Path, scope: Scope, owner: Owner, wait: bool = False, command: str = "",
                 heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.out_dir, self.scope, self.owner, self.wait = out_dir, scope, owner, wait
        self.path = out_dir / scope.file_name
        self.command = command or shlex.join(sys.argv)[:1000]
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._beat = 0
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: dict[Path, tuple[int, float]] = {}  # another machine's lease: (beat seen, since when)
        self._said: set[Path] = set()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        waiting_for = None
        while True:
            blocker = self._try_acquire()
            if blocker is None:
                break
            path, holder = blocker
            state = self._judge(path, holder)
            if state == "stale":
                self._take_over(path, holder)
                continue
            if state == "alive" and not self.wait:
                raise JobError(f"output.path: {self.out_dir} is being written by another run: {holder.describe()}; "
                               f"{self._advice(holder)}")
            if state == "alive" and holder.run != waiting_for:
                log.warning("waiting for %s to finish with %s (--wait)", holder.describe(), self.out_dir)
                waiting_for = holder.run
            elif state == "watch" and path not in self._said:
                log.warning("%s: %s has not renewed its lease for a while; watching its heartbeat for up to %.0f s "
                            "before taking it over", self.out_dir, holder.describe(), self.stale_s)
                self._said.add(path)
            time.sleep(WAIT_POLL_S * random.uniform(0.5, 1.0))  # jitter: two waiters do not retry in step
        self._held = True
        self._thread = threading.Thread(target=self._heartbeat, name="batchvl-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file, if it still names this run."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._held:
            holder = read_holder(self.path)
            if holder is not None and holder.run == self.owner.run:
                self.path.unlink(missing_ok=True)
            beat_file(self.path, self.owner.run).unlink(missing_ok=True)
            fsync_dir(self.out_dir)
            self._held = False

    @property
    def claim(self) -> Claim:
        return Claim(self.owner, self.path)

    def _content(self) -> dict[str, Any]:
        return asdict(Holder(
            run=self.owner.run, host=socket.gethostname(), pid=os.getpid(), machine=machine_id(),
            pid_start=process_start(os.getpid()), index=self.scope.index, count=self.scope.count,
            exclusive=self.scope.exclusive, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            beat=self._beat, updated=time.time(), command=self.command, mutex=self.scope.mutex))

    def _try_acquire(self) -> tuple[Path, Holder | None] | None:
        """Create our lease file, then look for a run whose scope clashes with ours. None: the lease is ours.
        Otherwise (the lease file that blocks us, its holder), and ours is removed again."""
        if not create_json_once(self.path, self._content(), self.owner):
            return self.path, self._read_settled(self.path)
        for path, holder in holders(self.out_dir).items():
            if path == self.path or (holder is not None and not holder.scope.clashes(self.scope)):
                continue
            self.path.unlink(missing_ok=True)  # both back off when two clashing runs start at once
            return path, holder or self._read_settled(path)
        return None

    def _read_settled(self, path: Path) -> Holder | None:
        """A lease file's holder, giving a file in the middle of its creation a moment to be written."""
        for _ in range(20):
            holder = read_holder(path)
            if holder is not None or not path.exists():
                return holder
            time.sleep(0.05)
        return read_holder(path)

    def _judge(self, path: Path, holder: Holder | None) -> str:
        """`alive`, `stale` (take it over) or `watch` (another machine's lease that looks old by its own clock:
        stale if its heartbeat stays still for `stale_s` by ours)."""
        if holder is None:
            return "stale" if path.exists() else "gone"  # unreadable after a moment: not a live holder's file
        if holder.machine == machine_id():
            return "alive" if process_alive(holder.pid, holder.pid_start) else "stale"
        seen = self._watch.get(path)
        if seen is not None and seen[0] != holder.beat:  # it beat while we watched
            del self._watch[path]
            return "alive"
        if seen is None:
            if time.time() - holder.updated < self.stale_s:
                return "alive"  # fresh by its own clock (the common case, decided at once)
            self._watch[path] = seen = (holder.beat, time.monotonic())
        return "stale" if time.monotonic() - seen[1] >= self.stale_s else "watch"

    def _take_over(self, path: Path, holder: Holder | None) -> None:
        """Move the stale lease aside, unless another run has replaced it since we judged it."""
        self._watch.pop(path, None)
        aside = self.owner.temp(path.with_name(path.name + ".stale"))
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # another run took it over, or its holder released it
        moved = read_holder(aside)
        if moved is not None and (holder is None or moved.run != holder.run):  # not the one judged: put it back
            try:
                os.link(aside, path)
            except OSError:
                log.error("moved aside the live lease of %s by mistake; it stops at its next commit",
                          moved.describe())
        else:
            log.warning("%s: took over the lease of %s, which is gone", self.out_dir,
                        holder.describe() if holder else "a run (its lease file could not be read)")
            if moved is not None:
                beat_file(path, moved.run).unlink(missing_ok=True)
        aside.unlink(missing_ok=True)
        fsync_dir(self.out_dir)

    def _advice(self, holder: Holder) -> str:
        if holder.machine == machine_id():
            return "wait for it to finish, or rerun with --wait to wait for it"
        return (f"rerun with --wait to wait for it; if that run is dead, its lease is taken over once its "
                f"heartbeat has been still for {self.stale_s:.0f} s")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self.beat():
            pass

    def beat(self) -> bool:
        """One heartbeat: False (and no beat) when the lease no longer names this run. The beat goes to this
        run's beat file, never to the lease file (see the module docstring)."""
        holder = read_holder(self.path)
        if holder is None or holder.run != self.owner.run:
            log.error("%s: this run's lease was taken over (%s); it stops at its next commit",
                      self.out_dir, holder.describe() if holder else "the lease file is gone")
            return False
        self._beat += 1
        try:
            write_json_atomic(beat_file(self.path, self.owner.run),
                              {"run": self.owner.run, "beat": self._beat, "updated": time.time()}, self.owner)
        except OSError as e:  # a passing filesystem error: the next beat tries again
            log.warning("%s: could not renew the lease: %s", self.out_dir, e)
        return True


@dataclass(frozen=True)
class Claim:
    """What a writer of the run needs of its lease (picklable, for engine worker processes): the run's owner
    and the lease file, to check before each commit that the run still holds it."""

    owner: Owner
    lease_file: Path

    def check(self) -> None:
        """Raise OutputWriteError unless the lease file still names this run."""
        holder = read_holder(self.lease_file)
        if holder is None or holder.run != self.owner.run:
            who = holder.describe() if holder else "its lease file is gone"
            raise OutputWriteError(f"output.path: this run no longer holds {self.lease_file.parent} ({who}); it "
                                   "stopped before writing more. What was committed is kept")


def machine_id() -> str:
    """Equal for two processes exactly when their pids mean the same processes: host name, boot id and pid
    namespace. (Containers may share a host name; a reboot reuses pids.)"""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "/".join(parts)
