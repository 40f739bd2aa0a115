"""The Batch API's routes: `/v1/files` (upload, list, get, content) and `/v1/batches` (create, list, get, cancel),
over the server's BatchStore. Uploads are multipart forms, spooled to disk as they arrive (the body limit is
`Limits.max_upload_bytes`), then moved into the store."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from batchvl.serve.app import BodyTooLarge, read_json
from batchvl.serve.batches import BatchStore
from batchvl.serve.protocol import ApiError, bad, typed

ENDPOINTS = ("/v1/chat/completions",)


def batch_routes(server) -> list[Route]:
    store: BatchStore = server.batches

    async def upload(http: HttpRequest) -> Response:
        try:
            form = await http.form(max_files=1, max_fields=8)
        except BodyTooLarge:
            raise
        except Exception as e:  # not a multipart form, or a malformed one
            raise bad(f"expected a multipart form with `file` and `purpose`: {e}") from None
        try:
            purpose, file = form.get("purpose"), form.get("file")
            if purpose != "batch":
                raise bad(f"purpose: only `batch` files are taken, got {purpose!r}", "purpose")
            if file is None or isinstance(file, str):
                raise bad("file: missing (a multipart file field)", "file")
            temp = Path(tempfile.mkstemp(dir=store.root, prefix=".upload-")[1])
            try:
                await asyncio.get_running_loop().run_in_executor(None, _copy, file.file, temp)
                meta = store.add_file(temp, file.filename or "upload.jsonl", "batch")
            finally:
                temp.unlink(missing_ok=True)
        finally:
            await form.close()
        return JSONResponse(meta)

    async def list_files(_: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": store.files(), "has_more": False})

    async def get_file(http: HttpRequest) -> Response:
        return JSONResponse(_file(store, http.path_params["file_id"]))

    async def content(http: HttpRequest) -> Response:
        file_id = http.path_params["file_id"]
        _file(store, file_id)
        return FileResponse(store.file_content(file_id), media_type="application/jsonl")

    async def create(http: HttpRequest) -> Response:
        body = await read_json(http)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        file_id = typed(body, "input_file_id", str, required=True)
        endpoint = typed(body, "endpoint", str, required=True)
        if endpoint not in ENDPOINTS:
            raise bad(f"endpoint: only {', '.join(ENDPOINTS)} is served, got {endpoint!r}", "endpoint")
        window = typed(body, "completion_window", str, required=True)
        if window != "24h":
            raise bad(f"completion_window: must be 24h, got {window!r}", "completion_window")
        metadata = typed(body, "metadata", dict)
        return JSONResponse(store.create(file_id, endpoint, window, metadata))

    async def list_batches(http: HttpRequest) -> Response:
        try:
            limit = min(max(int(http.query_params.get("limit", 20)), 1), 100)
        except ValueError:
            raise bad("limit: must be an integer", "limit") from None
        found = store.batches()
        after = http.query_params.get("after")
        if after:
            ids = [b["id"] for b in found]
            found = found[ids.index(after) + 1:] if after in ids else []
        page = found[:limit]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(found) > limit})

    async def get_batch(http: HttpRequest) -> Response:
        batch = store.get(http.path_params["batch_id"])
        if batch is None:
            raise ApiError(404, f"No such batch: {http.path_params['batch_id']}", "batch_id", "batch_not_found")
        return JSONResponse(batch)

    async def cancel(http: HttpRequest) -> Response:
        return JSONResponse(store.cancel(http.path_params["batch_id"]))

    return [
        Route("/v1/files", upload, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", get_file, methods=["GET"]),
        Route("/v1/files/{file_id}/content", content, methods=["GET"]),
        Route("/v1/batches", create, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel, methods=["POST"]),
    ]


def _file(store: BatchStore, file_id: str) -> dict:
    meta = store.file(file_id)
    if meta is None:
        raise ApiError(404, f"No such file: {file_id}", "file_id", "file_not_found")
    return meta


def _copy(source, target: Path) -> None:
    source.seek(0)
    with open(target, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
