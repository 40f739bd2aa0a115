"""A `batchvl serve` for tests: the tiny model's Service, run by uvicorn on a loopback port in a thread of the
test process (one load of the model per module)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn

from batchvl.serve.app import Limits
from batchvl.serve.launch import ServeOptions, Service, serving_job

API_KEY = "test-key"
ENGINE = ["engine.backend=native", "engine.device=cpu", "engine.dtype=float32", "engine.max_batch_size=4"]


class Running:
    """A started server: its base URL and its Service."""

    def __init__(self, service: Service, server: uvicorn.Server, thread: threading.Thread):
        self.service, self.server, self.thread = service, server, thread
        port = server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def start(model: Path, state_dir: Path, media: Path, overrides: list[str] = (), **options) -> Running:
    opts = ServeOptions(host="127.0.0.1", port=0, api_key=API_KEY, allowed_local_media_path=media,
                        allow_private_media=True, state_dir=state_dir, **options)
    job = serving_job(str(model), [*ENGINE, *overrides], state_dir)
    service = Service(job, opts)
    server = uvicorn.Server(uvicorn.Config(service.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:  # uvicorn has no event for this; it is up within a second
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    return Running(service, server, thread)


SMALL_LIMITS = Limits(max_body_bytes=2 << 20, max_upload_bytes=4 << 20)
