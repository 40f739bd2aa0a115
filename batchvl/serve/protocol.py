"""OpenAI's chat completions format, read and written: a request body checked into a `ChatCall`, and the
response, chunk and error bodies. Field names and shapes follow OpenAI's API reference; nothing here knows
the engine.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from batchvl.config.spec import shown

MAX_N = 16  # choices per request, at most
MAX_STOPS = 8  # stop strings per request, at most (OpenAI allows 4)
UNSUPPORTED = ("tools", "functions", "tool_choice", "response_format", "logit_bias", "audio", "prediction")


class ApiError(Exception):
    """A request the server refuses: answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass(frozen=True)
class Sampling:
    """A request's generation settings, or None where it leaves them to the server's defaults."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None


@dataclass
class ChatCall:
    """A checked chat completion request."""

    model: str
    messages: list[dict[str, Any]]
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def parse_chat(body: Any, models: tuple[str, ...]) -> ChatCall:
    """A chat completion request body, checked: ApiError 400 naming the parameter for anything wrong, an unknown
    model included (code `model_not_found`; OpenAI itself answers that one with 404, issue 18 asks for 400)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = typed(body, "model", str, required=True)
    if model not in models:
        raise ApiError(400, f"The model {shown(model)} does not exist; this server serves {', '.join(models)}",
                       "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages: must be a non-empty array of messages", "messages")
    for i, message in enumerate(messages):
        _check_message(message, i)
    for key in UNSUPPORTED:
        if body.get(key) is not None:
            raise bad(f"{key}: not supported by this server", key)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs: not supported by this server", "logprobs")
    for key in ("presence_penalty", "frequency_penalty"):
        value = _number(body, key)
        if value not in (None, 0):
            raise bad(f"{key}: not supported by this server (use repetition_penalty)", key)
    n = _integer(body, "n", 1, MAX_N)
    stream = typed(body, "stream", bool)
    options = typed(body, "stream_options", dict)
    if options is not None and not stream:
        raise bad("stream_options: only with stream: true", "stream_options")
    include_usage = bool(options and typed(options, "include_usage", bool, key="stream_options.include_usage"))
    return ChatCall(model, messages, parse_sampling(body), n or 1, bool(stream), include_usage)


def parse_sampling(body: dict[str, Any]) -> Sampling:
    """The generation parameters of a request body (chat or completions names), checked."""
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p is not None and top_p == 0:
        raise bad("top_p: must be > 0", "top_p")
    top_k = _integer(body, "top_k", -1)
    repetition_penalty = _number(body, "repetition_penalty", 0)
    if repetition_penalty is not None and repetition_penalty == 0:
        raise bad("repetition_penalty: must be > 0", "repetition_penalty")
    seed = _integer(body, "seed", -(1 << 63), (1 << 63) - 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise bad("stop: must be a non-empty string or an array of them", "stop")
    if stop is not None and len(stop) > MAX_STOPS:
        raise bad(f"stop: at most {MAX_STOPS} stop strings", "stop")
    return Sampling(max_tokens, temperature, top_p, None if top_k in (None, -1) else top_k, repetition_penalty,
                    seed, None if stop is None else tuple(stop), _integer(body, "min_tokens", 0),
                    typed(body, "ignore_eos", bool))


def _check_message(message: Any, i: int) -> None:
    """The shape OpenAI gives a message; what its content means (parts, images) is batchvl.prepare.messages'."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad(f"{where}: must be an object with a role and content", where)
    if not isinstance(message.get("role"), str):
        raise bad(f"{where}.role: must be a string", f"{where}.role")
    content = message.get("content")
    if not isinstance(content, (str, list)):
        raise bad(f"{where}.content: must be a string or an array of content parts", f"{where}.content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
                raise bad(f"{where}.content[{j}]: must be a text or image_url part", f"{where}.content[{j}]")


def typed(body: dict, name: str, kind: type, required: bool = False, key: str | None = None) -> Any:
    """body[name] when it is a `kind` (None when absent, unless `required`); ApiError 400 naming it otherwise."""
    value = body.get(name)
    if value is None:
        if required:
            raise bad(f"{key or name}: required", key or name)
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad(f"{key or name}: expected {_KIND_NAMES[kind]}, got {shown(value)}", key or name)
    return value


_KIND_NAMES = {str: "a string", bool: "a boolean", dict: "an object", int: "an integer", float: "a number"}


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = typed(body, name, int)
    if value is not None and (value < low or (high is not None and value > high)):
        limits = f">= {low}" if high is None else f"between {low} and {high}"
        raise bad(f"{name}: must be an integer {limits}, got {shown(value)}", name)
    return value


def _number(body: dict, name: str, low: float | None = None, high: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{name}: expected a number, got {shown(value)}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(f"{name}: must be between {low} and {high}, got {shown(value)}", name)
    return float(value)


# ---- responses -----------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(call: ChatCall, choices: list[tuple[str, str]], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """A whole chat completion; `choices`: (text, finish reason) per choice, in order."""
    return {
        "id": call.id, "object": "chat.completion", "created": call.created, "model": call.model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(call: ChatCall, index: int, delta: dict[str, Any], finish_reason: str | None = None,
               include_usage: bool = False) -> dict[str, Any]:
    """One streamed chunk of choice `index`."""
    chunk = {"id": call.id, "object": "chat.completion.chunk", "created": call.created, "model": call.model,
             "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(call: ChatCall, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {"id": call.id, "object": "chat.completion.chunk", "created": call.created, "model": call.model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
