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
            self.seconds[name] += time.perf_counter() - start

    def _barrier(self) -> None:
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
