"""Where the time goes: seconds per named stage, summed over a run.

With `sync` the device is synchronised at each stage boundary, so GPU time lands in the stage that
queued it (benchmarks turn this on; normal runs leave it off and measure host time only).
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
    def stage(self, name: str) -> Iterator[None]:
        self._barrier()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._barrier()
            took = time.perf_counter() - start
            self.seconds[name] += took
            if self.entries is not None:
                self.entries.append((name, start, took))

    def _barrier(self) -> None:
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
