"""The engine a Batch API job runs on: it hands the job's rows to the server's scheduler, which runs them on the
server's one engine beside the online requests, so a batch never loads a second model.

Each row keeps its request's own parameters (the `sampling` keep column, as JSON): they are read here and
checked as an online request's are, so a batch row and the same request sent online are run alike.
"""

from __future__ import annotations

import json
import threading

from batchvl.core import Request, Result
from batchvl.engine.base import Engine, GenerationParams
from batchvl.serve.model import ServedModel
from batchvl.serve.protocol import ApiError, parse_sampling
from batchvl.serve.scheduler import Scheduler, Ticket

SAMPLING = "sampling"  # the keep column holding a row's parameters


class SchedulerEngine(Engine):
    """`generate` queues the rows with the scheduler and waits for all of them. Thread-safe to call from the
    job's thread; `set_params` is ignored (each row carries its own)."""

    def __init__(self, scheduler: Scheduler, model: ServedModel):
        self.scheduler, self.model = scheduler, model
        self.max_batch_size = scheduler.engine.max_batch_size
        self.params = model.defaults

    def set_params(self, params: GenerationParams) -> None:
        self.params = params

    def generate(self, requests: list[Request]) -> list[Result]:
        results: list[Result | None] = [None] * len(requests)
        tickets = []
        left = threading.Semaphore(0)

        def done_at(i: int, request: Request):
            def done(outcome: Result | BaseException) -> None:
                results[i] = outcome if isinstance(outcome, Result) else Result.failed(
                    request.id, f"internal: {type(outcome).__name__}: {outcome}", request.keep)
                left.release()
            return done

        for i, request in enumerate(requests):
            try:
                key, limit = self.model.params(_sampling(request), len(request.prompt_ids))
            except ApiError as e:
                results[i] = Result.failed(request.id, f"{'prompt' if e.code == 'context_length_exceeded' else 'input'}"
                                                       f": {e.message}", request.keep)
                continue
            if request.max_new_tokens is not None:
                limit = min(limit, request.max_new_tokens)
            request.max_new_tokens = limit
            tickets.append(Ticket(request, key, done_at(i, request), online=False))
        self.scheduler.submit(tickets)
        for _ in tickets:
            left.acquire()
        return results  # type: ignore[return-value]


def _sampling(request: Request):
    raw = request.keep.get(SAMPLING)
    body = json.loads(raw) if isinstance(raw, str) else raw or {}
    if not isinstance(body, dict):
        raise ApiError(400, "the request's parameters are not an object")
    return parse_sampling(body)
