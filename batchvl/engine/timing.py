"""Where the time goes: seconds per named stage, summed over a run.

With `sync` the device is synchronised at each stage boundary, so GPU time lands in the stage that
queued it (benchmarks turn this on; normal runs leave it off and measure host time only). A stage that queues no
device work and follows one that ended synchronised (the loop's media wait, once per row) passes sync=False: each
synchronisation lets the GIL go, and taking it back from busy preparation threads is time the run would not spend.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimes:
    # Where set (a list; the GPU scripts set it on the class, for every instance), each stage's entry is added to
    # it as (name, start, seconds), start on time.perf_counter's clock: docs/gpu-checks/stage_trace.py.
    entries: list[tuple[str, float, float]] | None = None

    def __init__(self, sync: bool = False):
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str, sync: bool = True) -> Iterator[None]:
        """Time the block as stage `name`; `sync` False: no device synchronisation at its ends, whatever self.sync."""
        sync = sync and self.sync
        self._barrier(sync)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._barrier(sync)
            took = time.perf_counter() - start
            self.seconds[name] += took
            if self.entries is not None:
                self.entries.append((name, start, took))

    @staticmethod
    def _barrier(sync: bool) -> None:
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
