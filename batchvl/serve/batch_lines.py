"""A Batch API batch's output and error files: one line per request, in OpenAI's batch output format. Line ids
derive from the batch and the custom_id, so writing a file again gives the same lines."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def line_id(batch_id: str, custom_id: str) -> str:
    """A batch file line's id: the same for the same batch and request, every time the file is written."""
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
