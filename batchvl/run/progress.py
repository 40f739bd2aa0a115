"""The progress bar: rows/s from tqdm itself, plus images/s, output tokens/s and errors so far, and with engine
workers, each worker's rows/s (`gpu0 3.1/s gpu1 3.0/s`)."""

from __future__ import annotations

import time

from tqdm import tqdm

from batchvl.core import Result


class Progress:
    """The run's bar over `total` rows. `workers`: labels whose own rates the postfix shows."""

    def __init__(self, total: int, enabled: bool = True, workers: list[str] = ()):
        self.bar = tqdm(total=total, unit="row", disable=not enabled, dynamic_ncols=True, smoothing=0.1)
        self.start = time.perf_counter()
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
        self.bar.update(rows)
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        rates = " ".join(f"{w} {n / max(now - self.worker_start.get(w, now), 1e-9):.1f}/s"
                         for w, n in self.worker_rows.items())
        self.bar.set_postfix_str(
            f"img/s={self.images / elapsed:.2f} tok/s={self.tokens / elapsed:.1f} errors={self.errors}"
            + (f" {rates}" if rates else ""), refresh=False)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
