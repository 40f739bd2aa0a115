"""What a run reports: its `Summary` (the line the CLI prints) and the output folder's `_summary.json`,
rewritten at each commit (`OutputCounts`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from batchvl.core import Result
from batchvl.io.durable import Owner, write_json_atomic
from batchvl.io.readers import read_rows
from batchvl.io.shards import Shard
from batchvl.io.writer import SUMMARY_NAME, error_kind
from batchvl.run.plan import Plan

log = logging.getLogger(__name__)


@dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    images: int = 0
    output_tokens: int = 0
    skipped: int = 0
    elapsed_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)  # media wait, vision, prefill, decode, writing
    load_s: float = 0.0  # building the engine (loading the model), part of elapsed_s
    interrupted: int = 0  # the signal that stopped the run early (SIGINT, SIGTERM), 0 if it ran to the end
    stopped: bool = False  # the run stopped before its last row (a signal, or run_job's `stopping`)
    committed: int = 0  # rows of this run committed to part files
    counts_images: bool = True  # False where results come back without their image count (the Ray path)
    folder: FolderRows | None = None  # the output folder's rows when the run ended, earlier runs' too

    def add(self, result: Result) -> None:
        """Count one row this run produced."""
        if result.error is None:
            self.ok += 1
            self.images += result.images
            self.output_tokens += result.output_tokens
        else:
            self.failed += 1

    def line(self, out_dir: Path) -> str:
        """The run's line. Its rates count from when the model was loaded, as the progress bar's do; the load
        time is shown on its own."""
        t = max(self.elapsed_s - self.load_s, 1e-9)
        done = self.ok + self.failed
        images = f"{self.images / t:.2f} images/s, " if self.counts_images else ""
        load = f" ({self.load_s:.1f} s loading the model)" if self.load_s else ""
        return (f"batchvl: {self.ok} rows ok, {self.failed} failed, {self.skipped} already done; "
                f"{self.elapsed_s:.1f} s{load}; {done / t:.2f} rows/s, {images}"
                f"{self.output_tokens / t:.1f} output tokens/s -> {out_dir}")

    def failed_lines(self) -> list[str]:
        """The output folder's failed rows by error kind, an example id each (none when no row failed)."""
        if self.folder is None or not self.folder.failed:
            return []
        return ["failed rows by error kind (the whole output folder; `batchvl status OUT/` lists them too):",
                *self.folder.error_lines()]


@dataclass
class FolderRows:
    """An output folder's rows: how many are ok, the failed ones by error kind, and one failed id per kind."""

    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.ok + sum(self.failed.values())

    def error_lines(self) -> list[str]:
        """One line per error kind, most frequent first, each with an example id: `  media: 12 rows (e.g. id
        'a17')`."""
        kinds = sorted(self.failed.items(), key=lambda kv: (-kv[1], kv[0]))
        return [f"  {kind}: {n} row(s)" + (f" (e.g. id {self.examples[kind]!r})" if kind in self.examples else "")
                for kind, n in kinds]

    def too_many_failed(self, max_fraction: float) -> str | None:
        """Why the rows failed too often (every row failed, or more than `max_fraction` of them), or None."""
        failed, total = sum(self.failed.values()), self.total
        if not failed:
            return None
        if failed == total:
            return f"every row of the output folder failed ({total})"
        if failed / total > max_fraction:
            return (f"{failed} of the output folder's {total} rows failed ({100 * failed / total:.1f}%, more than "
                    f"run.max_error_fraction {max_fraction:g})")
        return None


def failed_by_kind(results: list[Result]) -> dict[str, int]:
    """How many of `results` failed, by error kind."""
    failed: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            kind = error_kind(r.error)
            failed[kind] = failed.get(kind, 0) + 1
    return failed


def failed_examples(results: list[Result]) -> dict[str, str]:
    """The id of the first of `results` that failed, for each error kind."""
    examples: dict[str, str] = {}
    for r in results:
        if r.error is not None:
            examples.setdefault(error_kind(r.error), r.id)
    return examples


class OutputCounts:
    """The output folder's `_summary.json`: rows ok and failed (by error kind) over the whole folder, and this
    run's committed rows, seconds and rows/s. Rewritten atomically at each commit."""

    def __init__(self, out_dir: Path, ok: int, failed: dict[str, int], start: float, owner: Owner,
                 shard: Shard | None = None, examples: dict[str, str] | None = None):
        self.out_dir, self.ok, self.failed, self.start, self.owner = out_dir, ok, failed, start, owner
        self.examples = dict(examples or {})
        self.this_run = 0
        self.shard = shard
        self.shard_rows = 0  # input rows the shard owns
        self.shard_done = 0  # of those, already in the output when the run started
        self.name = shard.summary_name if shard else SUMMARY_NAME

    @classmethod
    def of(cls, plan: Plan, start: float, shard: Shard | None = None) -> OutputCounts:
        """The counts of a run of `plan`, starting from what its output folder holds."""
        return cls(plan.job.output_dir, plan.done_ok, dict(plan.done_failed), start, plan.claim.owner, shard,
                   plan.done_examples)

    def rows(self) -> FolderRows:
        """The folder's rows as counted so far."""
        return FolderRows(self.ok, dict(self.failed), dict(self.examples))

    def count_todo(self, plan: Plan) -> int:
        """Output rows this run has to do (of the shard, with one), for the progress bar: generation.n per input
        row."""
        n = plan.job.generation.n
        if self.shard is None:
            return plan.rows * n - plan.done_rows
        self.shard_rows = n * sum(1 for _, r in read_rows(plan.files, plan.ids) if self.shard.owns(r.id))
        done = plan.done if n == 1 else (i for i, _ in plan.done_samples)
        self.shard_done = sum(1 for i in done if self.shard.owns(i.split("#dup@")[0]))
        return self.shard_rows - self.shard_done

    def commit(self, results: list[Result]) -> None:
        """Count a committed part's rows."""
        self.add_committed(len(results), failed_by_kind(results), failed_examples(results))

    def add_committed(self, rows: int, failed: dict[str, int], examples: dict[str, str] | None = None) -> None:
        """Count `rows` committed rows, of which `failed` (by error kind) failed; `examples`: a failed id of each
        kind."""
        for kind, row_id in (examples or {}).items():
            self.examples.setdefault(kind, row_id)
        for kind, n in failed.items():
            self.failed[kind] = self.failed.get(kind, 0) + n
        self.ok += rows - sum(failed.values())
        self.this_run += rows
        self.write("running")

    def write(self, state: str) -> None:
        """Rewrite the summary file with `state` (running, finished, interrupted, failed)."""
        elapsed = time.perf_counter() - self.start
        try:
            shard = {} if self.shard is None else {
                "shard": self.shard.label, "rows_in_shard": self.shard_rows,
                "rows_done_in_shard": self.shard_done + self.this_run}
            write_json_atomic(self.out_dir / self.name, {
                "state": state,
                **shard,
                "rows_ok": self.ok,
                "rows_failed": sum(self.failed.values()),
                "failed_by_kind": dict(sorted(self.failed.items())),
                "rows_this_run": self.this_run,
                "elapsed_s": round(elapsed, 3),
                "rows_per_s": round(self.this_run / max(elapsed, 1e-9), 3),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "run": self.owner.run,
            }, self.owner)
        except OSError as e:  # the summary is informative; the parts are what counts
            log.warning("could not write %s: %s", self.name, e)

