"""The progress bar: rows/s from tqdm itself, plus images/s, output tokens/s and errors so far."""

from __future__ import annotations

import time

from tqdm import tqdm

from batchvl.core import Result


class Progress:
    def __init__(self, total: int, enabled: bool = True):
        self.bar = tqdm(total=total, unit="row", disable=not enabled, dynamic_ncols=True, smoothing=0.1)
        self.start = time.perf_counter()
        self.images = 0
        self.tokens = 0
        self.errors = 0

    def update(self, result: Result) -> None:
        if result.error is None:
            self.images += result.images
            self.tokens += result.output_tokens
        else:
            self.errors += 1
        self.bar.update(1)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"img/s={self.images / elapsed:.2f} tok/s={self.tokens / elapsed:.1f} errors={self.errors}", refresh=False)

    def close(self) -> None:
        self.bar.close()
