"""A chaos soak: shards of one run, at once on one output folder, SIGKILLed at random moments and restarted.

    python -m batchvl.tools.soak [--rows N] [--kills K] [--shards S] [--seed X] [--work DIR]

It writes a tiny random checkpoint and an input of N rows (text-only rows, small PNG/JPEG files, image bytes,
and a few rows bad on purpose: batchvl.tools.soak_data), then starts `batchvl run job.yaml --shard I/S` for
every I at once, as separate processes writing one output folder. Each shard is killed with SIGKILL at
moments drawn from a seeded generator and restarted at once with the same command, while the others keep
running, until K kills have been made and every shard has exited 0. Most kills come once the process has
committed a part, when its shard has done a drawn share of its rows, after a further random delay (so they
land anywhere in reading, preparing, generating and writing); a share of them (`--early`) come at a random
moment of a process's start instead (loading, resuming), before it commits anything.

Then it checks, prints a table and exits non-zero if a check fails:
- every input id appears exactly once in the output, and only the rows meant to be bad have an error;
- the text of a sample of ids equals that of one clean run (unsharded, never killed, its own folder, over
  the sampled rows alone, at another batch size: a row's text must not depend on its batch), which runs
  alongside the shards;
- no shard process exited non-zero except by the soak's own SIGKILL (its stderr's tail is printed), every
  planned kill was made, and no temporary file is left in the folder;
- resident memory is flat: each process's VmRSS and VmHWM (from /proc/<pid>/status, polled) give a peak per
  segment (one process's life between its start and its end), and no peak is far above the typical one.

A short version runs in the test suite (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from batchvl.tools.soak_data import (
    Dataset,
    Verdict,
    check_output,
    compare_texts,
    job_dict,
    make_dataset,
    read_output,
    write_subset,
)
from batchvl.tools.soak_shards import Segment, ShardRunner, SoakSettings, plan_kills

MARKER = "batchvl-soak.txt"
MB = 1024  # kB


@dataclass
class SoakReport:
    settings: SoakSettings
    segments: list[Segment] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    soak_s: float = 0.0  # the shards' run, kills and restarts included
    clean_s: float = 0.0
    total_s: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.verdicts) and all(v.ok for v in self.verdicts)


def prepare_work(work: Path) -> None:
    """Make `work` ready: new, empty, or a soak's folder (whose data, output and logs go; a model stays)."""
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()) and not (work / MARKER).is_file():
        raise SystemExit(f"soak: {work} is not empty and is not a soak's folder (no {MARKER}); give another --work")
    for name in ("data", "out", "clean", "logs"):
        shutil.rmtree(work / name, ignore_errors=True)
    (work / MARKER).write_text("A batchvl chaos soak's folder (python -m batchvl.tools.soak). A new soak here "
                               "removes data/, out/, clean/ and logs/.\n")


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def soak(settings: SoakSettings, log: Callable[[str], None] | None = None) -> SoakReport:
    """Run the soak in `settings.work` and return its report (`report.ok`, `format_report(report)`).
    `log`, when given, gets a line of progress now and then."""
    say = log or (lambda _line: None)
    begin = time.monotonic()
    work = settings.work.resolve()
    prepare_work(work)
    model = settings.model
    if model is None:
        from batchvl.tools.tiny import make_tiny_model  # torch: only when the soak writes the model itself

        model = work / "model"
        make_tiny_model(model, seed=0)
    data = make_dataset(work / "data", settings.rows, settings.seed, settings.image_share, settings.bad_rows)
    out, logs = work / "out", work / "logs"
    logs.mkdir()
    job = write_job(work / "job.yaml", job_dict(model, data.folder / "input", data.folder / "media", out,
                                                settings.batch, settings.rows_per_file, settings.new_tokens))
    rng = random.Random(settings.seed)
    plans = plan_kills(settings, rng)
    sample = sorted(rng.sample(sorted(data.good), min(settings.sample, len(data.good))))
    say(f"soak: {settings.rows} rows ({len(data.bad)} bad on purpose), {settings.shards} shards at once on {out}, "
        f"{settings.kills} kills planned ({sum(k.early for p in plans for k in p)} at a start); a clean run of "
        f"{len(sample)} rows alongside")
    report = SoakReport(settings)
    t0 = time.monotonic()
    clean = CleanRun(settings, data, sample, model, work / "clean")
    runners = [ShardRunner(i, settings, job, logs, out / f"_summary-shard-{i}-of-{settings.shards}.json", t0,
                           plans[i]) for i in range(settings.shards)]
    timed_out = False
    try:
        for runner in runners:
            runner.start()
        last_said = t0
        while not all(r.done for r in runners):
            now = time.monotonic()
            for runner in runners:
                runner.tick(now)
            _hand_on_kills(runners)
            clean.poll()
            if now - t0 > settings.timeout_s:
                timed_out = True
                break
            if now - last_said > 30:
                last_said = now
                say(f"soak: {now - t0:.0f} s, {_kills_made(runners)}/{settings.kills} kills, "
                    + ", ".join(f"shard {r.shard}: {r.progress:.0%}" for r in runners))
            time.sleep(settings.poll_s)
        report.soak_s = time.monotonic() - t0
        clean_rows, clean_verdict = clean.finish(max(1.0, settings.timeout_s - (time.monotonic() - t0)))
    finally:
        for runner in runners:
            runner.stop()
        clean.stop()
    report.clean_s = clean.seconds
    report.segments = sorted((s for r in runners for s in r.segments), key=lambda s: (s.shard, s.number))
    write_samples(report.segments, logs / "rss.csv")
    rows, damaged = read_output(out)
    report.verdicts = [
        *check_output(data, rows, damaged),
        clean_verdict or compare_texts(rows, clean_rows, sample),
        _exits_verdict(report.segments, timed_out, settings),
        _kills_verdict(runners, settings),
        Verdict("no temporary files left", not list(out.glob(".tmp*")),
                f"{len(list(out.glob('.tmp*')))} left in the output folder"),
        memory_verdict(report.segments, settings.peak_ratio),
    ]
    report.total_s = time.monotonic() - begin
    return report


class CleanRun:
    """One run over the sampled rows alone, started with the shards: unsharded, never killed, in a folder of
    its own, at another batch size (so a row's text must not depend on its batch)."""

    def __init__(self, settings: SoakSettings, data: Dataset, sample: list[str], model: Path, folder: Path):
        inp = write_subset(data, sample, folder / "input")
        self.out = folder / "out"
        job = write_job(folder / "job.yaml", job_dict(model, inp, data.folder / "media", self.out,
                                                      settings.clean_batch, settings.rows_per_file,
                                                      settings.new_tokens))
        self.err = folder / "stderr.txt"
        self.start = time.monotonic()
        self.seconds = 0.0
        with open(self.err, "wb") as err:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                [sys.executable, "-m", "batchvl", "run", str(job), "--quiet"], stdout=subprocess.DEVNULL,
                stderr=err, stdin=subprocess.DEVNULL, env=ShardRunner.environment(settings))

    def poll(self) -> None:
        """Note when it ended, if it has."""
        if self.proc is not None and not self.seconds and self.proc.poll() is not None:
            self.seconds = time.monotonic() - self.start

    def finish(self, timeout_s: float) -> tuple[list[dict], Verdict | None]:
        """Its rows, and a failed verdict if it did not exit 0 in time."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return [], Verdict("text = one clean run", False, f"the clean run did not end within {timeout_s:.0f} s")
        self.poll()
        self.proc = None
        if rc != 0:
            tail = " | ".join(self.err.read_text(errors="replace").strip().splitlines()[-3:])
            return [], Verdict("text = one clean run", False, f"the clean run exited {rc}: {tail}")
        return read_output(self.out)[0], None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _hand_on_kills(runners: list[ShardRunner]) -> None:
    """A shard that finished before its last planned kills came hands them to one still running."""
    running = [r for r in runners if not r.done]
    for runner in runners:
        if runner.done and runner.kills and running:
            running[0].kills += runner.kills
            runner.kills = []


def _kills_made(runners: list[ShardRunner]) -> int:
    return sum(s.ended == "killed" for r in runners for s in r.segments)


def _exits_verdict(segments: list[Segment], timed_out: bool, settings: SoakSettings) -> Verdict:
    bad = [s for s in segments if s.ended not in ("killed", "exit 0")]
    detail = ", ".join(f"shard {s.shard} segment {s.number}: {s.ended} at {s.end:.1f} s" for s in bad)
    if timed_out:
        detail = f"not done within {settings.timeout_s:.0f} s; " + detail
    return Verdict("no process died unasked", not bad and not timed_out,
                   detail or f"{len(segments)} processes: each ended by our SIGKILL or with exit 0")


def _kills_verdict(runners: list[ShardRunner], settings: SoakSettings) -> Verdict:
    made = _kills_made(runners)
    early = sum(1 for r in runners for s in r.segments if s.ended == "killed" and s.first_commit is None)
    per_shard = ", ".join(f"shard {r.shard}: {sum(s.ended == 'killed' for s in r.segments)}" for r in runners)
    return Verdict("kills made", made >= settings.kills,
                   f"{made} of {settings.kills} SIGKILLs ({per_shard}; {early} before the process committed a part)")


def memory_verdict(segments: list[Segment], ratio: float) -> Verdict:
    """Flat memory: among the processes that committed rows, no peak (VmHWM) above `ratio` x their median peak.

    A process's RSS climbs for its first several thousand rows before it levels off (allocator caches: one
    uninterrupted process over this data reached a VmHWM of 730 MB after 2,000 rows, 920 MB after 15,000, and
    930 MB from 25,000 rows to its end at 40,000), so a process killed soon after its first commit peaks lower
    than one that ran to its shard's end; `ratio` leaves room for that. What it catches: memory that
    grows with the rows a process has done (a leak) or with the rows already in the folder (what a restart
    loads), beyond that warm-up."""
    peaks = [s.peak_kb for s in segments if s.rows > 0 and s.peak_kb]
    if not peaks:
        return Verdict("resident memory flat", False, "no process committed rows")
    median = statistics.median(peaks)
    worst = max(peaks)
    return Verdict("resident memory flat", worst <= ratio * median,
                   f"peak RSS per process {min(peaks) / MB:.0f} to {worst / MB:.0f} MB, median {median / MB:.0f} MB "
                   f"(at most {ratio:g} x the median allowed), over {len(peaks)} processes that committed rows")


def write_samples(segments: list[Segment], path: Path) -> None:
    """Every RSS sample, as CSV: shard, segment, seconds since the soak began, VmRSS in kB."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("shard,segment,t_s,rss_kb\n")
        for s in segments:
            f.writelines(f"{s.shard},{s.number},{t:.2f},{rss}\n" for t, rss in s.samples)


def format_report(report: SoakReport) -> str:
    """The segment table, the stderr of processes that died unasked, the checks and the verdict."""
    lines = ["segments (one per process; RSS from /proc/<pid>/status, polled every "
             f"{report.settings.poll_s:g} s; peak = VmHWM)",
             f"{'shard':>5} {'seg':>4} {'start s':>8} {'life s':>7} {'ended':>10} {'rows':>7} "
             f"{'1st commit s':>12} {'RSS then MB':>11} {'peak RSS MB':>11} {'growth MB':>9}"]
    for s in report.segments:
        committed = s.first_commit is not None
        first = f"{s.first_commit - s.start:.1f}" if committed else "-"
        at_commit = f"{s.rss_at_commit_kb / MB:.0f}" if committed else "-"
        growth = s.growth_kb(report.settings.growth_min_s)
        growth = "-" if growth is None else f"{growth / MB:+.0f}"
        lines.append(f"{s.shard:>5} {s.number:>4} {s.start:>8.1f} {s.end - s.start:>7.1f} {s.ended:>10} "
                     f"{s.rows:>7} {first:>12} {at_commit:>11} {s.peak_kb / MB:>11.0f} {growth:>9}")
    for s in report.segments:
        if s.stderr_tail:
            lines += [f"shard {s.shard} segment {s.number} ({s.ended}), the end of its stderr:",
                      *("    " + line for line in s.stderr_tail.splitlines())]
    lines.append("checks")
    lines += [f"  {'PASS' if v.ok else 'FAIL'}  {v.name}: {v.detail}" for v in report.verdicts]
    st = report.settings
    lines.append(f"(every RSS sample: {report.settings.work / 'logs' / 'rss.csv'})")
    lines.append(f"soak {'PASSED' if report.ok else 'FAILED'}: {st.rows} rows, {st.shards} shards, seed {st.seed}; "
                 f"{report.total_s:.0f} s in all (shards {report.soak_s:.0f} s, the clean run alongside "
                 f"{report.clean_s:.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batchvl.tools.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=SoakSettings.rows, help="input rows (default %(default)s)")
    p.add_argument("--kills", type=int, default=SoakSettings.kills, help="SIGKILLs in all (default %(default)s)")
    p.add_argument("--shards", type=int, default=SoakSettings.shards, help="shards at once (default %(default)s)")
    p.add_argument("--seed", type=int, default=SoakSettings.seed, help="data and kill moments (default %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="the soak's folder (default: a new temporary one)")
    p.add_argument("--sample", type=int, default=SoakSettings.sample,
                   help="ids compared with a clean run (default %(default)s)")
    p.add_argument("--early", type=float, default=SoakSettings.early,
                   help="share of kills during a process's start (default %(default)s)")
    p.add_argument("--timeout", type=float, default=SoakSettings.timeout_s,
                   help="seconds the shards may take in all (default %(default)s)")
    p.add_argument("--model", type=Path, default=None, help="a tiny checkpoint (default: one is written)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="batchvl-soak-"))
    settings = SoakSettings(work=work, rows=args.rows, kills=args.kills, shards=args.shards, seed=args.seed,
                            sample=args.sample, early=args.early, timeout_s=args.timeout, model=args.model)
    report = soak(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_report(report))
    print(f"(folder: {work})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
