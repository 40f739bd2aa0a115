"""The server's counters, gauges and histograms, written in Prometheus' text exposition format (`GET /metrics`).

A few dozen lines of our own rather than a client library: the server has a handful of series, all in one
process. Updates come from the event loop and the engine's thread, so each takes a lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

PREFIX = "batchvl_"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value


class Metrics:
    """Every series of the server. Names are written with the `batchvl_` prefix."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._histograms: dict[str, _Histogram] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._help: dict[str, tuple[str, str]] = {}

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)

    def histogram(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self._help[name] = ("histogram", help)
        self._histograms[name] = _Histogram(buckets)

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A gauge whose value `read()` gives when the metrics are written."""
        self._help[name] = ("gauge", help)
        self._gauges[name] = read

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._histograms[name].observe(value)

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (tests, the log)."""
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0)

    def render(self) -> str:
        """Every series in the text exposition format (version 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, help) in sorted(self._help.items()):
                full = PREFIX + name
                lines += [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    series = [(k[1], v) for k, v in self._counters.items() if k[0] == name] or [((), 0)]
                    lines += [f"{full}{_labels(labels)} {_number(v)}" for labels, v in sorted(series)]
                elif kind == "gauge":
                    lines.append(f"{full} {_number(self._gauges[name]())}")
                else:
                    h = self._histograms[name]
                    for bound, count in zip(h.buckets, h.counts, strict=True):
                        lines.append(f'{full}_bucket{{le="{_number(bound)}"}} {count}')
                    lines += [f'{full}_bucket{{le="+Inf"}} {h.total}', f"{full}_sum {_number(h.sum)}",
                              f"{full}_count {h.total}"]
        return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def server_metrics() -> Metrics:
    """The server's series, declared (gauges are added by the parts that know their values)."""
    m = Metrics()
    m.counter("requests_total", "HTTP requests answered, by route and status code")
    m.counter("prompt_tokens_total", "prompt tokens of the requests run, image context tokens included")
    m.counter("completion_tokens_total", "tokens generated")
    m.counter("engine_rows_total", "rows run by the engine, by origin (online, batch)")
    m.histogram("request_latency_seconds", "time from a chat request's arrival to its last byte",
                LATENCY_BUCKETS)
    m.histogram("time_to_first_token_seconds", "time from a streamed request's arrival to its first text",
                LATENCY_BUCKETS)
    m.histogram("queue_wait_seconds", "time a prepared row waits for the engine", LATENCY_BUCKETS)
    m.histogram("engine_batch_rows", "rows per engine call, those that joined a running batch included",
                BATCH_BUCKETS)
    m.histogram("engine_call_seconds", "time of each engine call", LATENCY_BUCKETS)
    return m
