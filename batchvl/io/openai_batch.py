"""OpenAI Batch API files: a request line in, a result line out.

A request line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {a chat request}}`.
`chat_request_to_row` makes it the row batchvl runs: the custom_id is the row's id, the body's messages are the
row's chat messages (a messages column: text and image_url parts), its max_tokens (or max_completion_tokens)
the row's own limit, and the body's sampling parameters are carried along for the caller to honour or refuse.

A result line is `{"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id", "body":
{a chat.completion}}, "error": null}`; a request that failed has `"response": null, "error": {"code",
"message"}`. Line ids are derived from the batch and the custom_id, so writing a file again gives the same lines.

(The `batchvl serve` branch wrote this module; the input/output formats branch has one of the same name and
interface, `chat_request_to_row`, for `input.format: openai-batch`: one of the two is kept when they merge.)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

CHAT_URL = "/v1/chat/completions"
LIMIT_KEYS = ("max_completion_tokens", "max_tokens")  # the first one set is the row's limit
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "min_tokens", "ignore_eos",
                 "n", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "stream", "tools",
                 "tool_choice", "response_format")
IGNORED_KEYS = ("model", "messages", "user", "metadata", "store", "service_tier", "stream_options")


def chat_request_to_row(request: Any) -> tuple[dict[str, Any], str | None]:
    """One parsed request line as (row data, None), or (row data holding what could be read, why the request
    cannot run). Row data: `custom_id`, `messages` (as the request has them), `max_tokens` (None: the
    runner's default), `model`, and `sampling`: the request's other body parameters by name ({} for none)."""
    if not isinstance(request, dict):
        return {"custom_id": None}, "a request line must be a JSON object"
    row: dict[str, Any] = {"custom_id": request.get("custom_id")}
    if not isinstance(row["custom_id"], str) or not row["custom_id"]:
        return row, "custom_id: must be a non-empty string"
    method, url = request.get("method"), request.get("url")
    if method != "POST" or url != CHAT_URL:
        return row, f"method and url must be POST {CHAT_URL}, got {_short(method)} {_short(url)}"
    body = request.get("body")
    if not isinstance(body, dict):
        return row, "body: must be a JSON object (a chat completion request)"
    unknown = sorted(k for k in body if k not in (*LIMIT_KEYS, *SAMPLING_KEYS, *IGNORED_KEYS))
    if unknown:
        return row, f"body.{unknown[0]}: not supported"
    limit = next((body[k] for k in LIMIT_KEYS if body.get(k) is not None), None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        return row, f"body.max_tokens: must be an integer >= 1, got {_short(limit)}"
    row.update(messages=body.get("messages"), max_tokens=limit, model=body.get("model"),
               sampling={k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None})
    return row, None


def line_id(batch_id: str, custom_id: str) -> str:
    """A result line's id: the same for the same batch and request, every time the file is written."""
    return hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).hexdigest()[:32]


def result_line(batch_id: str, custom_id: str, body: dict[str, Any]) -> str:
    """The output file's line for a request answered with the chat.completion `body`."""
    rid = line_id(batch_id, custom_id)
    return json.dumps({"id": f"batch_req_{rid}", "custom_id": custom_id,
                       "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None},
                      ensure_ascii=False) + "\n"


def error_line(batch_id: str, custom_id: str | None, code: str, message: str) -> str:
    """The error file's line for a request that failed."""
    rid = line_id(batch_id, custom_id or "")
    return json.dumps({"id": f"batch_req_{rid}", "custom_id": custom_id, "response": None,
                       "error": {"code": code, "message": message}}, ensure_ascii=False) + "\n"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."
