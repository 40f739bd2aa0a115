"""The HTTP layer: a Starlette application over one `Server` (the served model, the scheduler, the metrics and
the Batch API's store). It talks to the engine only through the scheduler.

Every refusal is OpenAI's error body with its status: 400 for what is wrong with a request, 401 without the
API key (when one is set; `/health` and `/metrics` need none), 413 for a body over the limit (checked on
Content-Length and again while the body is read), 429 when the queue is full. An unexpected exception in a
handler is a 500 for that request alone.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from batchvl.core import Request
from batchvl.serve.chat import answer, start_chat, stream
from batchvl.serve.metrics import Metrics
from batchvl.serve.model import ServedModel
from batchvl.serve.protocol import ApiError, bad, parse_chat
from batchvl.serve.scheduler import QueueFull, Scheduler

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_body_bytes: int = 32 << 20  # a JSON request (images as data URIs included)
    max_upload_bytes: int = 512 << 20  # a Batch API file upload


class BodyTooLarge(Exception):
    pass


class Server:
    """What the routes share."""

    def __init__(self, model: ServedModel, scheduler: Scheduler, metrics: Metrics, names: tuple[str, ...],
                 api_key: str | None = None, limits: Limits | None = None, batches: Any = None):
        self.model, self.scheduler, self.metrics, self.names = model, scheduler, metrics, names
        self.api_key, self.limits, self.batches = api_key, limits or Limits(), batches
        self.started = int(time.time())

    def count_tokens(self, request: Request, completion: int) -> None:
        self.metrics.inc("prompt_tokens_total", len(request.prompt_ids))
        self.metrics.inc("completion_tokens_total", completion)


def create_app(server: Server, lifespan=None, more_routes: list[Route] = ()) -> Starlette:
    """The application: the chat routes, and `more_routes` (the Batch API's, serve.batch_routes)."""
    async def health(_: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(_: HttpRequest) -> Response:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(_: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": server.started, "owned_by": "batchvl",
             "root": str(server.model.plan.checkpoint.path), "max_model_len": server.model.context}
            for name in server.names]})

    async def chat(http: HttpRequest) -> Response:
        arrived = time.monotonic()
        call = parse_chat(await read_json(http), server.names)
        try:
            reservation = server.scheduler.reserve(call.n)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="queue_full") from None
        try:
            request = await server.model.prepare(call.messages)
            run = start_chat(server, call, request, reservation, arrived)
        except BaseException:
            reservation.release()
            raise
        if call.stream:
            return StreamingResponse(stream(server, run), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await answer(server, run))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    routes += list(more_routes)
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, BodyTooLarge: _too_large, Exception: _internal})
    return Guard(app, server)


async def read_json(http: HttpRequest) -> Any:
    """The request body as JSON; 400 when it is not."""
    body = await http.body()
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None


async def _api_error(_: HttpRequest, e: ApiError) -> Response:
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(_: HttpRequest, e: HTTPException) -> Response:
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


async def _too_large(_: HttpRequest, e: BodyTooLarge) -> Response:
    return JSONResponse(ApiError(413, str(e), code="request_too_large").body(), status_code=413)


async def _internal(_: HttpRequest, e: Exception) -> Response:
    log.exception("a request failed", exc_info=e)
    error = ApiError(500, f"internal error: {type(e).__name__}: {e}")
    return JSONResponse(error.body(), status_code=500)


class Guard:
    """ASGI middleware in front of every route: the API key, the body size limit, and the requests counter."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _send_json(counted_send, refusal)
                return
            limit = self.server.limits.max_upload_bytes if path == "/v1/files" else self.server.limits.max_body_bytes
            await self.app(scope, _limited(receive, limit), counted_send)
        finally:
            self.server.metrics.inc("requests_total", route=_route(path), code=str(status["code"]))

    def _refusal(self, scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.server.api_key
        if key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return ApiError(401, "Incorrect or missing API key: send it as `Authorization: Bearer KEY`",
                                code="invalid_api_key")
        length = headers.get("content-length")
        limit = self.server.limits.max_upload_bytes if scope["path"] == "/v1/files" \
            else self.server.limits.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            return ApiError(413, f"the request body is {int(length)} bytes, more than the {limit} this server "
                                 "takes", code="request_too_large")
        return None


def _limited(receive, limit: int):
    """`receive` that raises BodyTooLarge once the body read passes `limit` bytes (a chunked body has no
    Content-Length to refuse it by)."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(f"the request body is more than the {limit} bytes this server takes")
        return message

    return wrapped


async def _send_json(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/files", "/v1/batches")


def _route(path: str) -> str:
    """The route label of a path (ids cut off), so that the label's values stay few."""
    for route in _ROUTES:
        if path == route or path.startswith(route + "/"):
            return route
    return "other"


def state_dir_default() -> Path:
    return Path.home() / ".cache" / "batchvl" / "serve"
