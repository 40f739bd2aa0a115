"""`POST /v1/chat/completions`: a checked request is prepared, queued with the scheduler, and answered whole or
as server-sent events in OpenAI's chunk format.

Streaming granularity is the engine's: the native engine tells the rows' tokens at each host synchronisation
(every `check_every`, 8, decode steps), the transformers engine at the end. A slow reader holds up nothing: the
engine's thread only records each row's latest tokens, and the stream turns them into text when it is read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from batchvl.core import Request, Result
from batchvl.engine.stream import TextStream
from batchvl.serve.protocol import ApiError, ChatCall, chunk_body, completion_body, usage_chunk
from batchvl.serve.scheduler import Ticket


class Pending:
    """One choice's answer as the event loop sees it; fed from the engine's thread through `call_soon_threadsafe`.
    The choices of a request share `changed`, set whenever any of them has news."""

    def __init__(self, loop: asyncio.AbstractEventLoop, changed: asyncio.Event):
        self.loop, self.changed = loop, changed
        self.ids: list[int] | None = None  # the latest tokens told
        self.result: Result | BaseException | None = None

    def tokens(self, ids: list[int]) -> None:
        self._call(self._set_ids, ids)

    def done(self, result: Result | BaseException) -> None:
        self._call(self._set_result, result)

    def _call(self, fn, arg) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    def _set_ids(self, ids: list[int]) -> None:
        self.ids = ids
        self.changed.set()

    def _set_result(self, result: Result | BaseException) -> None:
        self.result = result
        self.changed.set()


@dataclasses.dataclass
class ChatRun:
    """A request's choices in the scheduler: the tickets and what the event loop sees of them."""

    call: ChatCall
    request: Request
    limit: int
    tickets: list[Ticket]
    pending: list[Pending]
    changed: asyncio.Event
    arrived: float

    async def results(self) -> list[Result]:
        """Every choice's result, in order; ApiError 500 when the engine failed on one."""
        while not all(p.result is not None for p in self.pending):
            self.changed.clear()
            await self.changed.wait()
        return [_result(p.result) for p in self.pending]


def start_chat(server, call: ChatCall, request: Request, reservation, arrived: float) -> ChatRun:
    """Queue the request's `n` choices (each a copy of `request`, with its own row id: a seeded request's choices
    are `0`, `1`, ... so that the same seed gives the same text; an unseeded one's are unique)."""
    key, limit = server.model.params(call.sampling, len(request.prompt_ids))
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    pending, tickets = [], []
    seeded = key.temperature == 0 or call.sampling.seed is not None
    for i in range(call.n):
        p = Pending(loop, changed)
        row = dataclasses.replace(request, id=str(i) if seeded else f"{call.id}/{i}", max_new_tokens=limit)
        tickets.append(Ticket(row, key, p.done, p.tokens if call.stream else None))
        pending.append(p)
    server.scheduler.submit(tickets, reservation)
    return ChatRun(call, request, limit, tickets, pending, changed, arrived)


async def answer(server, run: ChatRun) -> dict[str, Any]:
    """The whole completion body."""
    try:
        results = await run.results()
    finally:
        server.scheduler.cancel(run.tickets)  # a client gone before the engine took them
    completion = sum(r.output_tokens for r in results)
    server.count_tokens(run.request, completion)
    server.metrics.observe("request_latency_seconds", time.monotonic() - run.arrived)
    return completion_body(run.call, [(r.text or "", r.finish_reason) for r in results],
                           len(run.request.prompt_ids), completion)


async def stream(server, run: ChatRun) -> AsyncIterator[str]:
    """Server-sent events: each choice's role, its text as it comes, its finish reason; the usage with
    `stream_options.include_usage`; then `[DONE]`. An engine failure is an `error` event before `[DONE]`."""
    call = run.call
    key = run.tickets[0].key
    params = dataclasses.replace(key, max_new_tokens=run.limit)
    texts = [TextStream(server.model.tokenizer, params, run.limit) for _ in run.pending]
    finished = [False] * len(run.pending)
    completion, first = 0, True
    try:
        for i in range(call.n):
            yield _event(chunk_body(call, i, {"role": "assistant", "content": ""}, None, call.include_usage))
        while not all(finished):
            run.changed.clear()
            for i, p in enumerate(run.pending):
                if finished[i]:
                    continue
                if p.result is not None:
                    finished[i] = True
                    try:
                        result = _result(p.result)
                    except ApiError as e:
                        yield _event(e.body())
                        continue
                    delta = texts[i].finish(result.text or "")
                    completion += result.output_tokens
                    if delta:
                        yield _event(chunk_body(call, i, {"content": delta}, None, call.include_usage))
                    yield _event(chunk_body(call, i, {}, result.finish_reason, call.include_usage))
                elif p.ids is not None:
                    delta = texts[i].update(p.ids)
                    if delta:
                        if first:
                            server.metrics.observe("time_to_first_token_seconds", time.monotonic() - run.arrived)
                            first = False
                        yield _event(chunk_body(call, i, {"content": delta}, None, call.include_usage))
            if not all(finished):
                await run.changed.wait()
        if call.include_usage:
            yield _event(usage_chunk(call, len(run.request.prompt_ids), completion))
        yield "data: [DONE]\n\n"
        server.count_tokens(run.request, completion)
        server.metrics.observe("request_latency_seconds", time.monotonic() - run.arrived)
    finally:
        server.scheduler.cancel(run.tickets)


def _result(outcome: Result | BaseException) -> Result:
    if isinstance(outcome, BaseException):
        raise ApiError(500, f"the engine failed: {type(outcome).__name__}: {outcome}")
    if outcome.error is not None:
        raise ApiError(500, f"the request failed in the engine: {outcome.error}")
    return outcome


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
