"""`batchvl serve`: the serving job (model, engine, generation and media settings), the engine and everything
around it, and uvicorn.

`batchvl serve MODEL` serves a checkpoint with the default settings; `batchvl serve job.yaml` takes the
model and the `engine:`, `generation:`, `media:` and `chat_template` settings of a job file (its input and
output are not used); `--set KEY=VALUE` overrides either, as for `batchvl run`. The generation settings are the
defaults of requests that leave a parameter out.

SIGINT and SIGTERM stop the server taking connections; the requests in flight are answered, a running Batch
API batch stops feeding rows (the rows it wrote stay; it resumes at the next start), and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchvl.config import (
    EngineSpec,
    GenerationSpec,
    InputSpec,
    Job,
    JobError,
    MediaSpec,
    OutputSpec,
    apply_overrides,
    build_section,
    check_job,
    read_mapping,
)
from batchvl.config.spec import shown
from batchvl.run.loop import build_engine, engine_rows
from batchvl.run.plan import plan_model
from batchvl.serve.app import Limits, Server, create_app
from batchvl.serve.metrics import server_metrics
from batchvl.serve.model import MESSAGES, MediaPolicy, ServedModel
from batchvl.serve.scheduler import Scheduler

log = logging.getLogger(__name__)

DEFAULT_PORT = 23333  # LMDeploy's api_server's
BATCH_ROWS_PER_PART = 100  # a Batch API job commits its results this many rows at a time (output.rows_per_file)
JOB_KEYS = ("model", "chat_template", "engine", "generation", "media", "input", "output", "prompt")


@dataclass
class ServeOptions:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    model_name: str | None = None  # default: the model folder's name
    allowed_local_media_path: Path | None = None
    allow_private_media: bool = False
    state_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "batchvl" / "serve")
    max_waiting: int = 256  # online requests admitted and not yet in the engine; more get 429
    gather_ms: float = 5.0  # how long a request waits for others to share its batch
    limits: Limits = field(default_factory=Limits)
    batches: bool = True  # the Batch API


@dataclass
class _ServeInput(InputSpec):
    """The serving job's input: rows arrive over HTTP, as chat messages; there are no files."""

    @property
    def files(self) -> list[Path]:
        return []


def serving_job(source: str, overrides: list[str], state_dir: Path) -> Job:
    """The job the server runs with: from a job file (`*.yaml`, `*.yml`) or a model, `--set` applied. Raises
    JobError naming the key."""
    if source.endswith((".yaml", ".yml")):
        raw = read_mapping(source)
        if not isinstance(raw, dict):
            raise JobError("job: expected a mapping of keys at the top level")
        base = Path(source).resolve().parent
    else:
        raw, base = {"model": source}, Path.cwd()
    raw = apply_overrides(raw, overrides)
    for key in raw:
        if key not in JOB_KEYS:
            raise JobError(f"{shown(key, quote=False)}: unknown key (known keys here: {', '.join(sorted(JOB_KEYS))})")
    for key in ("model", "chat_template"):
        if key in raw and not isinstance(raw[key], str):
            raise JobError(f"{key}: expected a string, got {shown(raw[key])}")
    if "model" not in raw:
        raise JobError("model: missing (required)")
    job = Job(model=raw["model"], input=_ServeInput(path="<http>", messages_column=MESSAGES, base_dir=str(base)),
              output=build_section(OutputSpec, {"rows_per_file": BATCH_ROWS_PER_PART, **(raw.get("output") or {}),
                                                "path": str(state_dir)}, "output"),
              chat_template=raw.get("chat_template", "auto"),
              media=build_section(MediaSpec, raw.get("media") or {}, "media"),
              generation=build_section(GenerationSpec, raw.get("generation") or {}, "generation"),
              engine=build_section(EngineSpec, raw.get("engine") or {}, "engine"), base_dir=str(base))
    check_job(job)
    if len(job.engine.devices) > 1:
        raise JobError("engine.gpus: the server runs one engine, in its own process; set engine.gpus: 1 "
                       "(start one server per GPU behind a load balancer for more)")
    return job


class Service:
    """The loaded model, its scheduler and the HTTP application, built once; `app` is what uvicorn runs."""

    def __init__(self, job: Job, options: ServeOptions):
        self.job, self.options = job, options
        self.plan = plan_model(job)
        self.name = options.model_name or Path(job.model.rstrip("/")).name or job.model
        self.engine = build_engine(job, self.plan)
        self.metrics = server_metrics()
        refill = job.engine.backend == "native" and job.engine.refill is not False  # auto: requests end apart
        self.scheduler = Scheduler(self.engine, engine_rows(job), options.max_waiting, options.gather_ms / 1000,
                                   self.metrics, refill=refill)
        policy = MediaPolicy(options.allowed_local_media_path, options.allow_private_media)
        self.model = ServedModel(job, self.plan, policy)
        self.batches = None
        if options.batches:
            from batchvl.serve.batches import BatchStore

            self.batches = BatchStore(options.state_dir, job, self.scheduler, self.model, self.name)
        self.server = Server(self.model, self.scheduler, self.metrics, (self.name,), options.api_key,
                             options.limits, self.batches)
        routes = []
        if self.batches is not None:
            from batchvl.serve.batch_routes import batch_routes

            routes = batch_routes(self.server)
        self.app = create_app(self.server, self._lifespan, routes)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Any):
        if self.batches is not None:
            self.batches.start()
        try:
            yield
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """After the last request: stop the Batch API's runs, run what is queued, release the model."""
        loop = asyncio.get_running_loop()
        if self.batches is not None:
            await loop.run_in_executor(None, self.batches.stop)
        await loop.run_in_executor(None, self.scheduler.close)
        await self.model.close()
        self.engine.close()


def serve(job: Job, options: ServeOptions) -> int:
    """Run the server until SIGINT or SIGTERM (it stops taking connections, answers those in flight, then
    exits 0); returns the exit code."""
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, except that the signal it stopped on is not raised again once it has drained (its
        default), so that a requested stop exits 0, saying what stopped it."""

        stopped_by: list[int] = []

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self.stopped_by = list(self._captured_signals)
                self._captured_signals.clear()

    service = Service(job, options)
    config = uvicorn.Config(service.app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=None, lifespan="on")
    server = DrainingServer(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            shown_host = "localhost" if options.host in ("0.0.0.0", "::") else host
            print(f"batchvl serve: {service.name} on http://{shown_host}:{port}/v1 (pid {os.getpid()})",
                  flush=True)
        await task

    asyncio.run(main())
    if server.stopped_by:
        print(f"batchvl serve: {signal.Signals(server.stopped_by[0]).name}: stopped after answering the requests in "
              "flight", file=sys.stderr)
    if not server.started:
        print(f"batchvl: error: could not listen on {options.host}:{options.port}", file=sys.stderr)
        return 1
    return 0


__all__ = ["DEFAULT_PORT", "ServeOptions", "Service", "serve", "serving_job"]
