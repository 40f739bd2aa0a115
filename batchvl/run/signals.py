"""SIGINT and SIGTERM during a run: finish the batch in flight, then stop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


class Stop:
    """SIGINT / SIGTERM while running: the first asks the loop to stop after the batch in flight; a second exits
    at once with the same code (safe: part files are renamed into place whole, or not at all). `quiet`: say
    nothing (engine workers, whose coordinator speaks for them)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool = False):
        self.signum = 0
        self.quiet = quiet
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            os._exit(128 + self.signum)
        self.signum = signum
        if not self.quiet:
            name = signal.Signals(signum).name
            os.write(2, f"\nbatchvl: {name}: finishing the batch in flight, then stopping "
                        f"(again to stop at once)\n".encode())
