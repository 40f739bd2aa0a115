"""OpenAI Batch API files: request lines in (`input.format: openai-batch`), result lines out
(`output.format: openai-batch`, `batchvl export`).

A request line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {chat request}}`.
`chat_request_to_row` turns one into the row batchvl runs: its custom_id is the row's id, its messages are
the row's chat messages (read as `input.messages_column` cells are: text and `image_url` parts, with http(s),
data: and file:// URLs), and its `max_tokens` (or `max_completion_tokens`) the row's own limit. Sampling
parameters are carried as `sampling` for the caller to honour or refuse: a batch job runs every row with its
own generation settings and refuses a request that asks for others (README "OpenAI batch files"). A server
can honour them per request.

A result line is `{"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id", "body":
{chat.completion}}, "error": null}`, or for a row that failed `"response": null, "error": {"code", "message"}`.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from batchvl.config.spec import shown
from batchvl.core import FINISH_ERROR, Result, sample_key
from batchvl.io.columns import OWN_COLUMNS

CHAT_URL = "/v1/chat/completions"
# Request body keys and what becomes of them. `model`: the job's model answers every request (an OpenAI batch
# file names one model throughout); it is only echoed back. Keys not listed make the request an error row.
LIMIT_KEYS = ("max_completion_tokens", "max_tokens")  # the first one set is the row's max_new_tokens
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "min_tokens", "ignore_eos",
                 "frequency_penalty", "presence_penalty", "n")
IGNORED_KEYS = ("model", "messages", "user", "metadata", "store", "stream", "stream_options", "logprobs",
                "service_tier", "parallel_tool_calls")
# What a body key must be, where it is not left to `sampling`'s comparison: stream and logprobs must be off.
MUST_BE = {"stream": (False, None), "logprobs": (False, None)}


def chat_request_to_row(request: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """One parsed request line as (row data, None), or (row data with its custom_id alone, why it cannot run).

    The row data holds `custom_id` (None when missing: the reader then makes it an error row of its own),
    `messages` (the request's, as they are: batchvl.prepare.messages reads them), `max_tokens` (None: the
    job's), `model`, and `sampling`: the sampling parameters the request sets ({} for none)."""
    if not isinstance(request, dict):
        return {"custom_id": None}, "a request line must be a JSON object"
    row: dict[str, Any] = {"custom_id": request.get("custom_id")}
    method, url = request.get("method", "POST"), request.get("url", CHAT_URL)
    if method != "POST" or url != CHAT_URL:
        return row_error(row, f"asks for {shown(method)} {shown(url)}; only POST {CHAT_URL} is served")
    body = request.get("body")
    if not isinstance(body, dict):
        return row_error(row, "has no `body` object")
    unknown = [k for k in body if k not in (*LIMIT_KEYS, *SAMPLING_KEYS, *IGNORED_KEYS)]
    if unknown:
        return row_error(row, f"sets body.{unknown[0]}, which batchvl does not support per request")
    for key, allowed in MUST_BE.items():
        if body.get(key) not in allowed:
            return row_error(row, f"sets body.{key} to {shown(body[key])}; a batch result is never streamed "
                                  "and has no log probabilities")
    limit = None
    for key in LIMIT_KEYS:
        if body.get(key) is not None:
            limit = body[key]
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                return row_error(row, f"body.{key} must be an integer >= 1, got {shown(limit)}")
            break
    row.update(messages=body.get("messages"), max_tokens=limit, model=body.get("model"),
               sampling={k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None})
    return row, None


def row_error(row: dict[str, Any], why: str) -> tuple[dict[str, Any], str]:
    return row, why


JOB_NAMES = {"min_tokens": "min_new_tokens"}  # a request key whose job setting has another name


def sampling_conflict(sampling: dict[str, Any], job: dict[str, Any]) -> str | None:
    """Why a request's sampling parameters cannot run in a job whose generation settings are `job` (the
    generation section's values by name), or None when each equals the job's (or is OpenAI's default that
    the job also uses). A batch runs every row with one set of settings."""
    ours = {
        "temperature": job.get("temperature"),
        "top_p": job.get("top_p"),
        "seed": job.get("seed"),
        "stop": list(job.get("stop") or []),
        "top_k": job.get("top_k"),
        "repetition_penalty": job.get("repetition_penalty"),
        "min_tokens": job.get("min_new_tokens"),
        "ignore_eos": job.get("ignore_eos"),
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "n": job.get("n") or 1,
    }
    for key, value in sampling.items():
        if key == "seed" and not job.get("temperature"):
            continue  # greedy decoding draws no random numbers: any seed gives the same text
        asked = [value] if key == "stop" and isinstance(value, str) else value
        if isinstance(asked, bool) != (key == "ignore_eos") or asked != ours[key]:
            where = f"generation.{JOB_NAMES.get(key, key)}" if key not in ("frequency_penalty",
                                                                            "presence_penalty") else None
            job_says = f"this job runs with {where} {shown(ours[key])}" if where else \
                f"batchvl supports only {key} {ours[key]}"
            return (f"input: the request sets {key} {shown(value)}, but {job_says}; every row of a batch runs with "
                    "the job's generation settings (remove it from the request, or run such requests as a job of "
                    "their own)")
    return None


# ---- results ----------------------------------------------------------------------------------------------


def _stable(prefix: str, text: str) -> str:
    """An id derived from a row id, the same each time the row is written or exported."""
    return prefix + hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def result_line(result: Result, model: str, created: int | None = None) -> dict[str, Any]:
    """A Result as an OpenAI batch output line: a chat.completion response, or `error` for a failed row (its
    code is the error kind, `media` or `input`, and its message batchvl's whole error text). With generation.n > 1
each sample is a line of its own, whose one choice has the sample's index (a line of OpenAI's own holds its
n choices; batchvl writes each sample once, whenever it is done)."""
    key = sample_key(result.id, result.sample)  # sample k >= 1: ids of its own
    line: dict[str, Any] = {"id": _stable("batch_req_", key), "custom_id": result.id}
    if result.error is not None or result.finish_reason == FINISH_ERROR:
        message = result.error or "error"
        line.update(response=None, error={"code": message.split(":", 1)[0].strip() or "error", "message": message})
        return line
    body = {
        "id": _stable("chatcmpl-", key),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": result.sample or 0, "message": {"role": "assistant", "content": result.text},
                     "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.output_tokens,
                  "total_tokens": result.prompt_tokens + result.output_tokens},
    }
    line.update(response={"status_code": 200, "request_id": _stable("req_", key), "body": body}, error=None)
    return line


def is_result_line(line: dict[str, Any]) -> bool:
    """Whether an output JSONL line is an OpenAI batch result (else a plain `jsonl` output row)."""
    return "custom_id" in line and "response" in line and "finish_reason" not in line


def line_id_error(line: dict[str, Any]) -> tuple[Any, str | None]:
    """(row id, error text or None) of an OpenAI batch result line."""
    error = line.get("error")
    return line.get("custom_id"), (error.get("message") or "error") if isinstance(error, dict) else None


def line_result(line: dict[str, Any]) -> Result:
    """The Result an OpenAI batch result line was written from (for export to another format); batchvl's own
    columns in `keep`, as io.writer.table_results gives them, and the sample index also as `sample`."""
    row_id, error = line_id_error(line)
    own = {k: line[k] for k in OWN_COLUMNS if k in line}  # batchvl's own columns: top-level keys of a line
    sample = own.get("sample") if isinstance(own.get("sample"), int) else None
    if error is not None:
        return Result.failed(row_id, error, own, sample)
    body = (line.get("response") or {}).get("body") or {}
    choice = (body.get("choices") or [{}])[0]
    usage = body.get("usage") or {}
    return Result(row_id, (choice.get("message") or {}).get("content"), None, choice.get("finish_reason") or "stop",
                  usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), own, sample=sample)
