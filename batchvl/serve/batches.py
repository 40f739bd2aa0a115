"""The Batch API's files and batches, kept in the server's state folder, and the thread that runs the batches.

A batch runs as a batchvl job, so it inherits the runner's exactly-once output: its request lines become the
job's input rows (`rows.jsonl`: id = custom_id, the messages, the row's max_tokens, its other parameters as a
keep column), its results go to the job's output folder (`out/`, Parquet parts, committed whole), and a
batch interrupted by anything, `kill -9` included, is resumed when the server starts again: the job skips the
rows already written. The job runs on the server's own engine, through the scheduler (serve.proxy).

    STATE/files/<file id>/meta.json, content      uploaded files, and the output and error files made here
    STATE/batches/<batch id>/batch.json            the batch object (status, times, file ids)
    STATE/batches/<batch id>/rows.jsonl            its requests as job rows, written once (then `rows.done`)
    STATE/batches/<batch id>/invalid.jsonl         error lines of requests that cannot run at all
    STATE/batches/<batch id>/out/                  the job's output folder

A request that cannot run (a bad body, another model) is answered in the error file; an input file that is
not JSONL, or repeats a custom_id, fails the batch at validation, as OpenAI's does. Batches run one at a time,
in the order they were created; cancelling one stops it feeding rows, and its output file holds what was done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from batchvl.config import InputSpec, Job, OutputSpec
from batchvl.io.durable import Owner, write_json_atomic
from batchvl.io.openai_batch import chat_request_to_row
from batchvl.io.writer import part_files, read_done, read_part
from batchvl.run.local import run_job
from batchvl.serve.batch_lines import error_line, line_id, result_line
from batchvl.serve.model import MESSAGES, ServedModel
from batchvl.serve.protocol import ApiError, completion_body, parse_sampling
from batchvl.serve.proxy import SAMPLING, SchedulerEngine
from batchvl.serve.scheduler import Scheduler

log = logging.getLogger(__name__)

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
WINDOW_S = 24 * 3600


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class BatchStore:
    def __init__(self, root: Path, job: Job, scheduler: Scheduler, model: ServedModel, name: str):
        self.root, self.job, self.scheduler, self.model, self.name = Path(root), job, scheduler, model, name
        self.files_dir, self.batches_dir = self.root / "files", self.root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)
        self.owner = Owner.new()
        for leftover in self.root.glob(".upload-*"):  # uploads a killed server was receiving
            leftover.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._todo: queue.Queue[str | None] = queue.Queue()
        self._cancelled: set[str] = set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- files --------------------------------------------------------------------------------------------

    def add_file(self, upload: Path, filename: str, purpose: str) -> dict[str, Any]:
        """Move an uploaded file (already on disk) into the store."""
        file_id = new_id("file-")
        folder = self.files_dir / file_id
        folder.mkdir()
        shutil.move(upload, folder / "content")
        return self._file_meta(folder, filename, purpose)

    def _file_meta(self, folder: Path, filename: str, purpose: str) -> dict[str, Any]:
        meta = {"id": folder.name, "object": "file", "bytes": (folder / "content").stat().st_size,
                "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed",
                "expires_at": None, "status_details": None}
        write_json_atomic(folder / "meta.json", meta, self.owner)
        return meta

    def file(self, file_id: str) -> dict[str, Any] | None:
        return _read_json(self.files_dir / _safe(file_id) / "meta.json")

    def file_content(self, file_id: str) -> Path | None:
        path = self.files_dir / _safe(file_id) / "content"
        return path if self.file(file_id) is not None and path.is_file() else None

    def files(self) -> list[dict[str, Any]]:
        return sorted((m for f in self.files_dir.iterdir() if (m := _read_json(f / "meta.json"))),
                      key=lambda m: m["created_at"])

    # ---- batches ------------------------------------------------------------------------------------------

    def create(self, input_file_id: str, endpoint: str, window: str, metadata: dict | None) -> dict[str, Any]:
        meta = self.file(input_file_id)
        if meta is None:
            raise ApiError(404, f"No such file: {input_file_id}", "input_file_id", "file_not_found")
        if meta["purpose"] != "batch":
            raise ApiError(400, f"file {input_file_id} has purpose {meta['purpose']}, not batch", "input_file_id")
        now = int(time.time())
        batch = {"id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": input_file_id, "completion_window": window, "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + WINDOW_S, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata}
        (self.batches_dir / batch["id"]).mkdir()
        self._save(batch)
        self._todo.put(batch["id"])
        return batch

    def get(self, batch_id: str) -> dict[str, Any] | None:
        batch = _read_json(self.batches_dir / _safe(batch_id) / "batch.json")
        if batch is not None and batch["status"] in ("in_progress", "cancelling"):
            batch["request_counts"] = self._counts(batch)
        return batch

    def batches(self) -> list[dict[str, Any]]:
        found = (self.get(d.name) for d in self.batches_dir.iterdir())
        return sorted((b for b in found if b), key=lambda b: b["created_at"], reverse=True)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            batch = self.get(batch_id)
            if batch is None:
                raise ApiError(404, f"No such batch: {batch_id}", "batch_id", "batch_not_found")
            if batch["status"] not in ACTIVE:
                raise ApiError(409, f"batch {batch_id} is {batch['status']}: it cannot be cancelled")
            if batch["status"] != "cancelling":
                batch.update(status="cancelling", cancelling_at=int(time.time()))
                self._save(batch)
            self._cancelled.add(batch_id)
        return batch

    def _save(self, batch: dict[str, Any]) -> None:
        write_json_atomic(self.batches_dir / batch["id"] / "batch.json", batch, self.owner)

    def _update(self, batch_id: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            batch = _read_json(self.batches_dir / batch_id / "batch.json")
            if batch["status"] == "cancelling" and fields.get("status") == "in_progress":
                fields.pop("status")  # a cancel that came meanwhile wins
            batch.update(fields)
            self._save(batch)
        return batch

    # ---- the runner thread ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the runner; batches a previous server left unfinished (stopped or killed) run first."""
        unfinished = sorted((b for b in self.batches() if b["status"] in ACTIVE), key=lambda b: b["created_at"])
        for batch in unfinished:
            if batch["status"] == "cancelling":
                self._cancelled.add(batch["id"])
            log.info("resuming batch %s (%s)", batch["id"], batch["status"])
            self._todo.put(batch["id"])
        self._thread = threading.Thread(target=self._serve, name="batchvl-batches", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the engine call in flight; unfinished batches stay as they are, for the next start."""
        self._stopping.set()
        self._todo.put(None)
        if self._thread is not None:
            self._thread.join()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            batch_id = self._todo.get()
            if batch_id is None:
                return
            try:
                self._run(batch_id)
            except Exception as e:
                log.exception("batch %s failed", batch_id)
                self._update(batch_id, status="failed", failed_at=int(time.time()),
                             errors={"object": "list", "data": [{"code": "internal_error", "message": str(e),
                                                                  "line": None, "param": None}]})

    def _run(self, batch_id: str) -> None:
        folder = self.batches_dir / batch_id
        batch = _read_json(folder / "batch.json")
        if batch["status"] == "validating":
            problems = self._validate(batch, folder)
            if problems:
                self._update(batch_id, status="failed", failed_at=int(time.time()),
                             errors={"object": "list", "data": problems})
                return
            batch = self._update(batch_id, status="in_progress", in_progress_at=int(time.time()))
        if batch["status"] in ("in_progress", "cancelling") and batch_id not in self._cancelled:
            summary = run_job(self._job(folder), progress=False, engine=SchedulerEngine(self.scheduler, self.model),
                              stopping=lambda: self._stopping.is_set() or batch_id in self._cancelled)
            if summary.stopped and batch_id not in self._cancelled:
                return  # the server is stopping: the batch resumes at the next start
        cancelled = batch_id in self._cancelled
        if not cancelled:
            self._update(batch_id, status="finalizing", finalizing_at=int(time.time()))
        self._finish(batch_id, folder, cancelled)

    def _validate(self, batch: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
        """Write the batch's rows and invalid lines from its input file, once (streamed: a large file is never
        held in memory); the problems that fail it."""
        if (folder / "rows.done").exists():
            return []
        seen: set[str] = set()
        problems: list[dict[str, Any]] = []
        rows, invalid = folder / "rows.jsonl.tmp", folder / "invalid.jsonl.tmp"
        with open(self.file_content(batch["input_file_id"]), "rb") as f, open(rows, "w", encoding="utf-8") as out, \
                open(invalid, "w", encoding="utf-8") as bad:
            for number, line in enumerate(f, 1):
                if not line.strip() or len(problems) >= 100:
                    continue
                try:
                    request = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                    problems.append(_problem("invalid_json_line", f"line {number} is not JSON: {e}", number))
                    continue
                row, why = chat_request_to_row(request)
                custom_id = row.get("custom_id")
                if not isinstance(custom_id, str) or not custom_id:
                    why = why or "custom_id: must be a non-empty string"
                    problems.append(_problem("invalid_request", f"line {number}: {why}", number))
                    continue
                if custom_id in seen:
                    problems.append(_problem("duplicate_custom_id", f"custom_id {custom_id!r} is repeated", number))
                    continue
                seen.add(custom_id)
                why = why or self._refusal(row)
                if why is not None:
                    bad.write(error_line(batch["id"], custom_id, "invalid_request", why))
                    continue
                limit = row["max_tokens"] and min(row["max_tokens"], self.job.generation.max_new_tokens)
                out.write(json.dumps({"custom_id": custom_id, MESSAGES: row["messages"], "max_tokens": limit,
                                      SAMPLING: row["sampling"]}, ensure_ascii=False) + "\n")
            for file in (out, bad):
                file.flush()
                os.fsync(file.fileno())
        if not seen and not problems:
            problems.append(_problem("empty_file", "the input file holds no requests", None))
        if problems:
            return problems
        os.replace(rows, folder / "rows.jsonl")
        os.replace(invalid, folder / "invalid.jsonl")
        _write(folder / "rows.done", "")
        return []

    def _refusal(self, row: dict[str, Any]) -> str | None:
        """Why a well-formed request line cannot run here (its model, its parameters, its media URLs)."""
        if row.get("model") not in (None, self.name):
            return f"body.model: this server serves {self.name}, not {row.get('model')!r}"
        try:
            parse_sampling(row["sampling"])  # the checks an online request's parameters get
            if row["sampling"].get("n", 1) != 1 or row["sampling"].get("stream"):
                return "body.n and body.stream: a batch request has one choice and is not streamed"
            for k in ("tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "presence_penalty",
                      "frequency_penalty"):
                if row["sampling"].get(k):
                    return f"body.{k}: not supported by this server"
            for message in row["messages"] if isinstance(row["messages"], list) else []:
                for part in message.get("content") if isinstance(message, dict) and isinstance(
                        message.get("content"), list) else []:
                    if isinstance(part, dict) and part.get("type") == "image_url":
                        spec = part.get("image_url")
                        self.model.check_reference(spec.get("url") if isinstance(spec, dict) else spec)
        except ApiError as e:
            return e.message
        return None

    def _job(self, folder: Path) -> Job:
        j = self.job
        media = dataclasses.replace(j.media, allow_private_addresses=self.model.policy.allow_private)
        return dataclasses.replace(
            j, input=InputSpec(path=str(folder / "rows.jsonl"), id_column="custom_id", messages_column=MESSAGES,
                               max_new_tokens_column="max_tokens", base_dir=j.base_dir),
            output=OutputSpec(path=str(folder / "out"), keep_columns=[SAMPLING],
                              rows_per_file=j.output.rows_per_file),
            media=media)

    def _counts(self, batch: dict[str, Any]) -> dict[str, int]:
        folder = self.batches_dir / batch["id"]
        invalid = _lines(folder / "invalid.jsonl")
        total = _lines(folder / "rows.jsonl") + invalid
        done = read_done(folder / "out") if (folder / "out").is_dir() else None
        ok = done.ok if done else 0
        return {"total": total, "completed": ok, "failed": invalid + (sum(done.failed.values()) if done else 0)}

    def _finish(self, batch_id: str, folder: Path, cancelled: bool) -> None:
        """Write the output and error files from the job's output folder (streamed, part by part; again, the
        same, after a crash here) and mark the batch completed or cancelled."""
        out_id, err_id = f"file-{batch_id}-output", f"file-{batch_id}-error"
        for file_id in (out_id, err_id):
            (self.files_dir / file_id).mkdir(exist_ok=True)
        created = int(time.time())
        counts = {"completed": 0, "failed": 0}
        with open(self.files_dir / out_id / "content.tmp", "w", encoding="utf-8") as out, \
                open(self.files_dir / err_id / "content.tmp", "w", encoding="utf-8") as err:
            for line in _read_lines(folder / "invalid.jsonl"):
                err.write(line)
                counts["failed"] += 1
            for part in part_files(folder / "out") if (folder / "out").is_dir() else []:
                table = read_part(part, ["id", "text", "error", "finish_reason", "prompt_tokens", "output_tokens"])
                for r in table.to_pylist():
                    if r["error"] is not None:
                        err.write(error_line(batch_id, r["id"], r["error"].split(":", 1)[0], r["error"]))
                        counts["failed"] += 1
                        continue
                    call = _Call(self.name, f"chatcmpl-{line_id(batch_id, r['id'])}", created)
                    body = completion_body(call, [(r["text"] or "", r["finish_reason"])], r["prompt_tokens"],
                                           r["output_tokens"])
                    out.write(result_line(batch_id, r["id"], body))
                    counts["completed"] += 1
            for file in (out, err):
                file.flush()
                os.fsync(file.fileno())
        files = {}
        for kind, file_id, n in (("output", out_id, counts["completed"]), ("error", err_id, counts["failed"])):
            target = self.files_dir / file_id
            if n:
                os.replace(target / "content.tmp", target / "content")
                self._file_meta(target, f"{batch_id}_{kind}.jsonl", f"batch_{kind}")
                files[f"{kind}_file_id"] = file_id
            else:
                shutil.rmtree(target)
        total = _lines(folder / "rows.jsonl") + _lines(folder / "invalid.jsonl")
        now = int(time.time())
        state = {"status": "cancelled", "cancelled_at": now} if cancelled else {"status": "completed",
                                                                                  "completed_at": now}
        self._update(batch_id, request_counts={"total": total, **counts}, **files, **state)


@dataclasses.dataclass
class _Call:
    """What completion_body reads of a chat call."""

    model: str
    id: str
    created: int


def _problem(code: str, message: str, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def _safe(name: str) -> str:
    """An id as a folder name: no path separators, no dot-names."""
    return name if name and "/" not in name and "\\" not in name and not name.startswith(".") else "-"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file, fsynced, renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    except OSError:
        return []

