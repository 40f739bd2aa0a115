"""The one way to the engine: prepared requests from any number of clients wait here, and one thread runs them
through the engine in shared batches.

The engine is not thread-safe, so one thread owns it. A request joins the queue as a `Ticket`; the thread takes
the oldest ticket's group (tickets whose generation settings are equal: greedy requests all share one), waits a
short gathering window for more of it, and runs up to `rows` of them in one engine call. With an engine that
refills finished slots (native, engine.refill), tickets of the same group that arrive meanwhile join the
running batch (`Engine.arrivals`). Online requests go before Batch API rows.

Why groups: an engine call has one GenerationParams (the engine contract); a row's own limit is its Request's
max_new_tokens, so max_tokens never splits a group, and every greedy request shares one.

Bounded: at most `max_waiting` online requests are admitted and not yet in the engine (preparing their media
or queued); `reserve` refuses more (the server's 429). The event loop never waits for the engine: a ticket's
tokens and result reach it through callbacks it supplies, called on the engine's thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from batchvl.core import Request, Result
from batchvl.engine.base import Engine, GenerationParams
from batchvl.run.loop import run_batch
from batchvl.serve.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are admitted and waiting than the server takes."""


@dataclass(eq=False)
class Ticket:
    """A prepared request waiting for, or in, the engine. `on_tokens(ids)` (optional) and `on_done(result or
    exception)` are called on the engine's thread; they must only hand over, never block."""

    request: Request
    key: GenerationParams  # the group: settings with max_new_tokens 0 (each row's limit is its own)
    on_done: Callable[[Result | BaseException], None]
    on_tokens: Callable[[list[int]], None] | None = None
    online: bool = True
    queued: float = field(default_factory=time.monotonic)
    reservation: Reservation | None = None  # an online request's room in the queue, given back when taken


class Reservation:
    """Room for `n` online requests, taken at arrival; each is given back when its ticket reaches the engine, or
    by `release` when the request fails or is abandoned before that."""

    def __init__(self, scheduler: Scheduler, n: int):
        self.scheduler, self.left = scheduler, n

    def release(self, n: int | None = None) -> None:
        n = self.left if n is None else min(n, self.left)
        if n > 0:
            self.left -= n
            self.scheduler._give_back(n)


class Scheduler:
    def __init__(self, engine: Engine, rows: int, max_waiting: int, gather_s: float, metrics: Metrics,
                 refill: bool = False):
        self.engine, self.rows, self.max_waiting, self.gather_s = engine, rows, max_waiting, gather_s
        self.refill, self.metrics = refill, metrics
        self._cond = threading.Condition()
        self._queue: list[Ticket] = []
        self._reserved = 0  # online requests admitted and not yet in the engine
        self.running = 0  # rows in the engine now
        self._closing = False
        metrics.gauge("queue_depth", "online requests admitted and waiting for the engine (media included)",
                      lambda: self._reserved)
        metrics.gauge("queued_rows", "prepared rows waiting for the engine (Batch API rows included)",
                      lambda: len(self._queue))
        metrics.gauge("running_rows", "rows in the engine now", lambda: self.running)
        self._thread = threading.Thread(target=self._serve, name="batchvl-engine", daemon=True)
        self._thread.start()

    # ---- the event loop's side (any thread) ---------------------------------------------------------------

    def reserve(self, n: int) -> Reservation:
        """Admit `n` online requests, or raise QueueFull."""
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if self._reserved + n > self.max_waiting:
                raise QueueFull(f"{self._reserved} requests are waiting, the most this server queues is "
                                f"{self.max_waiting}")
            self._reserved += n
        return Reservation(self, n)

    def submit(self, tickets: list[Ticket], reservation: Reservation | None = None) -> None:
        """Queue tickets (online ones under `reservation`, which they keep until the engine takes them)."""
        with self._cond:
            for t in tickets:
                t.reservation = reservation
            self._queue.extend(tickets)
            self._cond.notify_all()

    def cancel(self, tickets: list[Ticket]) -> int:
        """Take tickets out of the queue if the engine has not taken them (a client that went away); returns
        how many were. Those already running finish, and their results are dropped by their owner."""
        gone = set(map(id, tickets))
        with self._cond:
            kept = [t for t in self._queue if id(t) not in gone]
            removed = [t for t in self._queue if id(t) in gone]
            self._queue = kept
        for t in removed:
            self._taken(t)
        return len(removed)

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the engine's thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _give_back(self, n: int) -> None:
        with self._cond:
            self._reserved -= n

    def _taken(self, ticket: Ticket) -> None:
        if ticket.reservation is not None:
            ticket.reservation.release(1)

    # ---- the engine's thread ----------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                self._gather()
                batch = self._take(self.rows)
            self._run(batch)

    def _gather(self) -> None:
        """Wait (lock held, released while waiting) until the next group is full or its oldest ticket has
        waited the gathering window."""
        while not self._closing:
            key = self._next_key()
            wait = self._queue[0].queued + self.gather_s - time.monotonic()
            if wait <= 0 or sum(t.key == key for t in self._queue) >= self.rows:
                return
            self._cond.wait(wait)

    def _next_key(self) -> GenerationParams:
        first = next((t for t in self._queue if t.online), self._queue[0])
        return first.key

    def _take(self, n: int, key: GenerationParams | None = None,
              fits: Callable[[Request], bool] | None = None) -> list[Ticket]:
        """Up to `n` queued tickets of group `key` (the next group's when None), oldest first (lock held)."""
        if not self._queue or n <= 0:
            return []
        key = self._next_key() if key is None else key
        taken, kept = [], []
        for t in self._queue:
            if len(taken) < n and t.key == key and (fits is None or fits(t.request)):
                taken.append(t)
            else:
                kept.append(t)
        self._queue = kept
        now = time.monotonic()
        for t in taken:
            self._taken(t)
            self.metrics.observe("queue_wait_seconds", now - t.queued)
        return taken

    def _run(self, batch: list[Ticket]) -> None:
        """One engine call for `batch`, and any tickets of its group that join it while it runs."""
        engine, key = self.engine, batch[0].key
        tickets = list(batch)
        by_request = {id(t.request): t for t in batch}

        def arrivals(n: int, fits: Callable[[Request], bool]) -> list[Request]:
            with self._cond:
                more = self._take(n, key, fits)
            tickets.extend(more)
            by_request.update((id(t.request), t) for t in more)
            if any(t.on_tokens is not None for t in more):
                engine.on_tokens = on_tokens  # read at the engine's next synchronisation
            self.running += len(more)
            return [t.request for t in more]

        def on_tokens(request: Request, ids: list[int]) -> None:
            t = by_request.get(id(request))
            if t is not None and t.on_tokens is not None:
                t.on_tokens(ids)

        limit = max(t.request.max_new_tokens or 1 for t in batch)
        params = dataclasses.replace(key, max_new_tokens=limit)
        self.running = len(batch)
        start = time.perf_counter()
        try:
            if engine.params != params:
                engine.set_params(params)
            # Only while a ticket streams: telling tokens costs the native engine a device read at every sync.
            engine.on_tokens = on_tokens if any(t.on_tokens is not None for t in batch) else None
            engine.arrivals = arrivals if self.refill else None
            try:
                results = engine.generate([t.request for t in batch])
            except Exception:  # run again row by row where it must (out of memory, a row that breaks the batch)
                log.warning("an engine call of %d rows failed; running its rows again without joins",
                            len(tickets), exc_info=True)
                engine.arrivals = None
                results = run_batch(engine, [t.request for t in tickets])
        except BaseException as e:  # the device or the job failed: these rows are answered with it
            log.exception("the engine failed on %d rows", len(tickets))
            for t in tickets:
                t.on_done(e)
            if not isinstance(e, Exception):
                raise
            return
        finally:
            engine.on_tokens = engine.arrivals = None
            self.running = 0
        self.metrics.observe("engine_call_seconds", time.perf_counter() - start)
        self.metrics.observe("engine_batch_rows", len(tickets))
        for t, result in zip(tickets, results, strict=True):
            self.metrics.inc("engine_rows_total", origin="online" if t.online else "batch")
            t.on_done(result)
