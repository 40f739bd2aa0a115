"""The progress bar: rows/s from tqdm itself, plus images/s, output tokens/s and errors so far, and with engine
workers, each worker's rows/s (`gpu0 3.1/s gpu1 3.0/s`).

On a stderr that is no terminal (a log file, a batch system's output) a bar's repaints would pile up as lines of
carriage returns, so there the bar is a log line every LOG_EVERY_S seconds and one at the end.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

from batchvl.core import Result

log = logging.getLogger(__name__)
LOG_EVERY_S = 30.0  # seconds between two progress lines where stderr is no terminal


class Progress:
    """The run's bar over `total` rows. `workers`: labels whose own rates the postfix shows."""

    def __init__(self, total: int, enabled: bool = True, workers: list[str] = ()):
        terminal = enabled and _is_terminal(sys.stderr)
        self.bar = tqdm(total=total, unit="row", disable=not terminal, dynamic_ncols=True, smoothing=0.1)
        self.log_lines = enabled and not terminal
        self.total, self.rows = total, 0
        self.start = time.perf_counter()
        self.logged = self.start
        self.images = 0
        self.tokens = 0
        self.errors = 0
        self.worker_rows = {w: 0 for w in workers}
        self.worker_start: dict[str, float] = {}  # when each worker's engine was ready

    def update(self, result: Result) -> None:
        """One row done (in this process)."""
        if result.error is None:
            self.add(1, result.images, result.output_tokens, 0)
        else:
            self.add(1, 0, 0, 1)

    def worker_ready(self, worker: str) -> None:
        """`worker` has loaded its engine: its rate counts from now."""
        self.worker_start[worker] = time.perf_counter()

    def add(self, rows: int, images: int, tokens: int, errors: int, worker: str | None = None) -> None:
        """`rows` rows done, by `worker` if named."""
        self.images += images
        self.tokens += tokens
        self.errors += errors
        if worker is not None:
            self.worker_rows[worker] += rows
        self.rows += rows
        self.bar.update(rows)
        now = time.perf_counter()
        self.bar.set_postfix_str(self._rates(now), refresh=False)
        if self.log_lines and now - self.logged >= LOG_EVERY_S:
            self._log(now)

    def _rates(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rates = " ".join(f"{w} {n / max(now - self.worker_start.get(w, now), 1e-9):.1f}/s"
                         for w, n in self.worker_rows.items())
        return (f"img/s={self.images / elapsed:.2f} tok/s={self.tokens / elapsed:.1f} errors={self.errors}"
                + (f" {rates}" if rates else ""))

    def _log(self, now: float) -> None:
        self.logged = now
        pct = f" ({100 * self.rows / self.total:.1f}%)" if self.total else ""
        log.info("progress: %d/%d rows%s, %.2f rows/s, %s", self.rows, self.total, pct,
                 self.rows / max(now - self.start, 1e-9), self._rates(now))

    def close(self) -> None:
        """Close the bar (where it is log lines: the last one)."""
        self.bar.close()
        if self.log_lines:
            self.log_lines = False
            self._log(time.perf_counter())


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False
