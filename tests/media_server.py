"""A local HTTP server for media tests: fixed bodies per path, optional delays and failure counts."""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    delay_s: float = 0.0
    fail_first: int = 0  # answer 503 this many times before succeeding
    retry_after: str | None = None  # the Retry-After header of those 503s
    hits: int = 0
    hit_times: list[float] = field(default_factory=list)  # time.monotonic() of each request
    gate: threading.Event | None = None  # when set: each request waits for it (up to 60 s) before answering


@dataclass
class MediaServer:
    routes: dict[str, Route] = field(default_factory=dict)
    in_flight: int = 0
    peak_in_flight: int = 0

    def start(self) -> str:
        owner = self
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                route = owner.routes.get(self.path)
                # "In flight" ends before the answer is written: once the client has it, it may start its
                # next request before this thread would get back from the write (a race seen in CI).
                with lock:
                    owner.in_flight += 1
                    owner.peak_in_flight = max(owner.peak_in_flight, owner.in_flight)
                answered = False

                def answering():
                    nonlocal answered
                    if not answered:
                        answered = True
                        with lock:
                            owner.in_flight -= 1

                try:
                    if route is None:
                        answering()
                        self.send_error(404)
                        return
                    route.hits += 1
                    route.hit_times.append(time.monotonic())
                    time.sleep(route.delay_s)
                    if route.gate is not None:
                        route.gate.wait(60)
                    answering()
                    if route.hits <= route.fail_first:
                        self.send_response(503)
                        if route.retry_after is not None:
                            self.send_header("Retry-After", route.retry_after)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(route.status)
                    self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    self.wfile.write(route.body)
                finally:
                    answering()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
