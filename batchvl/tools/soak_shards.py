"""The chaos soak's shard processes (batchvl.tools.soak): each started, polled for its memory, SIGKILLed at
its planned moments and restarted, one segment (a process's life) after another.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import batchvl

REPO = Path(batchvl.__file__).resolve().parents[1]


@dataclass
class SoakSettings:
    """What a soak does; the defaults are the full soak's (python -m batchvl.tools.soak)."""
    work: Path
    rows: int = 100_000
    kills: int = 20
    shards: int = 2
    seed: int = 0
    sample: int = 1000  # ids compared with the clean run
    model: Path | None = None  # a tiny checkpoint to use; default: written into work/model
    batch: int = 16
    clean_batch: int = 7  # another batch size for the clean run
    rows_per_file: int = 200
    new_tokens: int = 6
    image_share: float = 0.2
    bad_rows: int = 6
    early: float = 0.2  # share of the kills made during a process's start, before its first commit
    early_window_s: float = 6.0  # an early kill comes this long after the start, at most
    delay_s: float = 1.5  # a kill comes this long after its moment is reached, at most
    last_kill_at: float = 0.9  # no kill is due past this share of a shard's rows
    # A segment's peak RSS may be this much above the median peak (see memory_verdict). 1.8: a process killed soon
    # after its first commit peaks near 530 MB and one that runs on levels off near 930 (allocator caches). It was
    # 1.5 until processes stopped importing torch._dynamo at start (session 6), which lowered every baseline by
    # about 100 MB and, with the same warm-up growth, raised the ratio: 1.52 in a clean 2,000-row soak.
    peak_ratio: float = 1.8
    growth_min_s: float = 10.0  # RSS growth within a process is judged over at least this long after a commit
    timeout_s: float = 3600.0
    poll_s: float = 0.1
    threads: int = 0  # torch threads per shard process; 0: the cores shared among the shards


@dataclass
class Kill:
    """A planned SIGKILL of one shard's process: `early` ones come `delay` seconds after the process starts;
    the others once it has committed a part and its shard has done the share `at` of its rows, `delay`
    seconds later."""
    early: bool
    at: float
    delay: float


@dataclass
class Segment:
    """One shard process's life: from its start to its end (our SIGKILL, or an exit)."""
    shard: int
    number: int
    pid: int
    start: float
    end: float = 0.0
    ended: str = "running"
    rows: int = 0  # rows it committed (its shard summary's rows_this_run)
    first_commit: float | None = None
    rss_at_commit_kb: int = 0
    rss_peak_kb: int = 0  # the largest VmRSS polled
    hwm_kb: int = 0  # the last VmHWM read: the kernel's own peak
    samples: list[tuple[float, int]] = field(default_factory=list)
    stderr_tail: str = ""

    @property
    def peak_kb(self) -> int:
        return max(self.hwm_kb, self.rss_peak_kb)

    def growth_kb(self, min_s: float) -> int | None:
        """How much higher RSS went in the second half of its life after its first commit than in the first
        half (a leak's signature); None when that life was shorter than `min_s`."""
        if self.first_commit is None or self.end - self.first_commit < min_s:
            return None
        middle = (self.first_commit + self.end) / 2
        first = [rss for t, rss in self.samples if self.first_commit <= t < middle]
        second = [rss for t, rss in self.samples if t >= middle]
        return max(second) - max(first) if first and second else None


def plan_kills(settings: SoakSettings, rng: random.Random) -> list[list[Kill]]:
    """Each shard's kills in order: `kills` in all, spread over the shards as evenly as they go (the
    remainder to shards drawn at random); round(kills x early) of them, drawn at random, come at a start."""
    share, rest = divmod(settings.kills, settings.shards)
    extra = set(rng.sample(range(settings.shards), rest))
    counts = [share + (shard in extra) for shard in range(settings.shards)]
    slots = [shard for shard, n in enumerate(counts) for _ in range(n)]
    early = [0] * settings.shards
    for shard in rng.sample(slots, round(settings.kills * settings.early)):
        early[shard] += 1
    plans = []
    for shard, n in enumerate(counts):
        moments = sorted(rng.uniform(0.02, settings.last_kill_at) for _ in range(n - early[shard]))
        kills = [Kill(False, at, rng.uniform(0, settings.delay_s)) for at in moments]
        for _ in range(early[shard]):
            kills.insert(rng.randint(0, len(kills)), Kill(True, 0.0, rng.uniform(0.2, settings.early_window_s)))
        plans.append(kills)
    return plans


def proc_memory(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in kB, from /proc/<pid>/status; None once it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


class ShardRunner:
    """One shard: its process, restarted after each of our kills, and the segments it has lived."""

    def __init__(self, shard: int, settings: SoakSettings, job: Path, logs: Path, summary: Path, t0: float,
                 kills: list[Kill]):
        self.shard, self.settings, self.job, self.logs, self.summary, self.t0 = shard, settings, job, logs, summary, t0
        self.kills = kills
        self.segments: list[Segment] = []
        self.proc: subprocess.Popen | None = None
        self.kill_at: float | None = None
        self.done = False
        self.failures = 0
        self._summary_seen: tuple[int, int] | None = None
        self._last_progress = 0.0

    @property
    def segment(self) -> Segment:
        return self.segments[-1]

    @property
    def progress(self) -> float:
        """The share of its shard's rows done, as its summary file last said."""
        return self._last_progress

    @staticmethod
    def environment(settings: SoakSettings) -> dict[str, str]:
        """A batchvl process's environment: this batchvl first on the path, no fault injection, and torch
        threads so that the shards share the cores rather than fight over them."""
        threads = settings.threads or max(1, (os.cpu_count() or 1) // settings.shards)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.pop("BATCHVL_FAULT", None)
        return env

    def start(self) -> None:
        env = self.environment(self.settings)
        n = len(self.segments)
        stem = self.logs / f"shard{self.shard}-seg{n:03d}"
        cmd = [sys.executable, "-m", "batchvl", "run", str(self.job), "--quiet",
               "--shard", f"{self.shard}/{self.settings.shards}"]
        with open(f"{stem}.out", "wb") as out, open(f"{stem}.err", "wb") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self._summary_seen = self._summary_stat()
        self.kill_at = None
        self.segments.append(Segment(self.shard, n, self.proc.pid, time.monotonic() - self.t0))

    def _summary_stat(self) -> tuple[int, int] | None:
        try:
            st = self.summary.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _progress(self, now: float) -> float | None:
        """Its shard's share of rows done, once this process has committed a part (else None)."""
        stat = self._summary_stat()
        if stat is None or stat == self._summary_seen:
            return None if self.segment.first_commit is None else self._last_progress
        try:
            info = json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None
        self._summary_seen = stat
        self.segment.rows = int(info.get("rows_this_run", 0))
        if self.segment.rows and self.segment.first_commit is None:
            self.segment.first_commit = now - self.t0
            self.segment.rss_at_commit_kb = self.segment.samples[-1][1] if self.segment.samples else 0
        self._last_progress = info.get("rows_done_in_shard", 0) / max(1, info.get("rows_in_shard", 1))
        return self._last_progress if self.segment.first_commit is not None else None

    def _sample(self, now: float) -> None:
        memory = proc_memory(self.segment.pid)
        if memory is not None:
            seg = self.segment
            seg.samples.append((now - self.t0, memory[0]))
            seg.rss_peak_kb, seg.hwm_kb = max(seg.rss_peak_kb, memory[0]), max(seg.hwm_kb, memory[1])

    def _end(self, now: float, ended: str) -> None:
        self._progress(now)
        seg = self.segment
        seg.end, seg.ended, self.proc = now - self.t0, ended, None
        if ended not in ("killed", "exit 0"):
            err = self.logs / f"shard{self.shard}-seg{seg.number:03d}.err"
            seg.stderr_tail = "\n".join(err.read_text(errors="replace").strip().splitlines()[-15:])

    def tick(self, now: float) -> None:
        """Sample the process; restart it after our kill; make the next kill when it is due."""
        if self.proc is None:
            return
        self._sample(now)
        rc = self.proc.poll()
        if rc is not None:
            self._exited(now, rc)
            return
        progress = self._progress(now)
        if self.kill_at is None and self.kills:
            kill = self.kills[0]
            if kill.early:
                self.kill_at = self.t0 + self.segment.start + kill.delay
            elif progress is not None and progress >= kill.at:
                self.kill_at = now + kill.delay
        if self.kill_at is not None and now >= self.kill_at:
            self._sample(now)  # VmHWM as late as it can be read
            os.kill(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
            if rc == -signal.SIGKILL:
                self.kills.pop(0)
                self._end(time.monotonic(), "killed")
                self.start()
            else:  # it ended on its own just before
                self._exited(time.monotonic(), rc)

    def _exited(self, now: float, rc: int) -> None:
        self._end(now, f"exit {rc}" if rc >= 0 else f"signal {-rc}")
        if rc == 0:
            self.done = True
            return
        self.failures += 1
        if self.failures <= 5:
            self.start()  # an unexpected exit fails the soak; running on shows what else it leaves behind
        else:
            self.done = True

    def stop(self) -> None:
        """Kill the process still running (the soak's time is up, or it was interrupted)."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self._end(time.monotonic(), "stopped")
            self.done = True
