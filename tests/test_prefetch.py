"""The prefetch pipeline: input order kept, memory bounded, HTTP limits, retries and timeouts."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from batchvl.core import Request, Result, Row
from batchvl.media.fetch import FetchSettings
from batchvl.prepare.prefetch import Prefetcher
from batchvl.prepare.preparer import PrepareSettings, RowPreparer
from batchvl.prepare.prompt import PromptBuilder

from .conftest import drain_slowly, random_image
from .media_server import Route


class CountingTokenizer:
    """Just enough of a tokenizer for the prompt builder: one id per character."""

    bos_token = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def preparer(**overrides) -> RowPreparer:
    settings = dict(prompt="Describe.", prompt_column=None, image_column="image", max_dynamic_patch_column=None,
                    keep_columns=(), keep_as_json=True, min_tiles=1, max_tiles=2, use_thumbnail=True, tile_size=448,
                    max_prompt_tokens=100000)
    settings.update(overrides)
    return RowPreparer(PrepareSettings(**settings), PromptBuilder(CountingTokenizer(), None, tokens_per_tile=4))


def png(w=64, h=48, seed=0) -> bytes:
    buf = io.BytesIO()
    random_image(w, h, seed).save(buf, format="PNG")
    return buf.getvalue()


def rows_for(urls) -> list[tuple[Path, Row]]:
    return [(Path("rows.jsonl"), Row(id=f"r{i}", source=f"rows.jsonl:{i}", data={"image": u}))
            for i, u in enumerate(urls)]


def test_results_keep_input_order_when_early_rows_are_slow(server):
    s, base = server
    for i in range(12):
        s.routes[f"/{i}.png"] = Route(body=png(seed=i), delay_s=0.3 if i < 3 else 0.0)
    rows = rows_for([f"{base}/{i}.png" for i in range(12)])
    pre = Prefetcher(rows, preparer(), lambda f: Path("."), max_rows=12, threads=2)
    out = list(pre)
    pre.close()
    assert [r.id for r in out] == [f"r{i}" for i in range(12)]
    assert all(isinstance(r, Request) for r in out)
    assert s.peak_in_flight > 3  # fetched concurrently, not one after another


def test_at_most_prefetch_rows_are_in_flight(server):
    s, base = server
    for i in range(20):
        s.routes[f"/{i}.png"] = Route(body=png(seed=i), delay_s=0.05)
    pre = Prefetcher(rows_for([f"{base}/{i}.png" for i in range(20)]), preparer(), lambda f: Path("."),
                     max_rows=4, threads=2)
    seen = []
    for item in pre:
        seen.append(item.id)
        time.sleep(0.02)  # a slow consumer: the producer must wait for slots
    pre.close()
    assert len(seen) == 20 and s.peak_in_flight <= 4


def test_byte_budget_bounds_memory_under_a_slow_consumer(tmp_path):
    for i in range(10):
        random_image(900, 600, seed=i).save(tmp_path / f"{i}.png")
    rows = rows_for([str(tmp_path / f"{i}.png") for i in range(10)])
    one_row = 3 * 3 * 448 * 448 * 4  # a 900x600 image with max 2 tiles: 2 tiles + thumbnail, float32
    pre = Prefetcher(rows, preparer(), lambda f: tmp_path, max_rows=10, max_bytes=2 * one_row, threads=2)
    assert drain_slowly(pre) == 10
    assert pre.peak_bytes <= 3 * one_row  # the budget, plus the row the consumer waits for


def test_a_head_row_larger_than_the_budget_still_goes_through(tmp_path):
    random_image(2000, 1000).save(tmp_path / "big.png")
    pre = Prefetcher(rows_for([str(tmp_path / "big.png")] * 3), preparer(), lambda f: tmp_path, max_rows=3,
                     max_bytes=1000, threads=1)
    assert [type(x) for x in pre] == [Request, Request, Request]
    pre.close()


def test_transient_http_errors_are_retried(server):
    s, base = server
    s.routes["/flaky.png"] = Route(body=png(), fail_first=2)
    s.routes["/down.png"] = Route(body=png(), fail_first=10)
    fast = FetchSettings(http_retries=3, backoff_s=0.01)
    pre = Prefetcher(rows_for([f"{base}/flaky.png", f"{base}/down.png"]), preparer(), lambda f: Path("."),
                     fetch=fast)
    flaky, down = list(pre)
    pre.close()
    assert isinstance(flaky, Request) and s.routes["/flaky.png"].hits == 3
    assert isinstance(down, Result) and "HTTP 503 after 4 attempts" in down.error


def test_http_timeout_and_404_are_error_rows(server):
    s, base = server
    s.routes["/slow.png"] = Route(body=png(), delay_s=1.0)
    settings = FetchSettings(http_timeout_s=0.2, http_retries=0)
    pre = Prefetcher(rows_for([f"{base}/slow.png", f"{base}/missing.png"]), preparer(), lambda f: Path("."),
                     fetch=settings)
    slow, missing = list(pre)
    pre.close()
    assert "timed out" in slow.error and "HTTP 404" in missing.error


def test_http_concurrency_limit(server):
    s, base = server
    for i in range(16):
        s.routes[f"/{i}.png"] = Route(body=png(seed=i), delay_s=0.1)
    pre = Prefetcher(rows_for([f"{base}/{i}.png" for i in range(16)]), preparer(), lambda f: Path("."),
                     max_rows=16, fetch=FetchSettings(http_concurrency=3))
    assert len(list(pre)) == 16
    pre.close()
    assert s.peak_in_flight <= 3


def test_an_unreadable_input_stops_the_run_loudly():
    def rows():
        yield Path("x.jsonl"), Row(id="a", source="x.jsonl:1", data={"image": None})
        raise OSError("disk gone")

    pre = Prefetcher(rows(), preparer(), lambda f: Path("."))
    with pytest.raises(OSError, match="disk gone"):
        list(pre)
    pre.close()


class _Stop(BaseException):
    """Not an Exception: as a KeyboardInterrupt or SystemExit raised in the rows' iterator would be."""


def test_a_base_exception_from_the_rows_reaches_the_consumer_instead_of_hanging_it():
    import threading

    def rows():
        yield Path("x.jsonl"), Row(id="a", source="x.jsonl:1", data={"image": None})
        raise _Stop("interrupted")

    pre = Prefetcher(rows(), preparer(), lambda f: Path("."))
    seen, raised = [], []

    def consume():
        try:
            seen.extend(item.id for item in pre)
        except BaseException as e:  # whatever the producer met
            raised.append(e)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=10)
    hung = consumer.is_alive()
    pre.close()
    assert not hung, "the consumer still waits for a row the producer will never prepare"
    assert seen == ["a"] and [type(e) for e in raised] == [_Stop]


def test_bench_media_runs_every_method_on_both_workloads():
    from batchvl.tools.bench_media import format_table, run

    results = run(images=2, workloads=["7tile", "mixed"], naive_images=1, threads=[2], processes=[1], pipes=True)
    methods = ["naive loop", "threads", "processes", "processes, pipes"]
    assert [(r.workload, r.method) for r in results] == [(w, m) for w in ("7tile", "mixed") for m in methods]
    assert [r.tiles for r in results[1:4]] == [14, 14, 14]  # 2 images x 7 tiles, each way
    assert results[1].start_s is None and results[2].start_s > 0
    table = format_table(results)
    assert "| 7tile | processes | 1 | 2 | 14 |" in table and "main CPU ms/image" in table


def test_prefetch_shortens_the_gil_switch_interval_while_it_runs(tmp_path):
    """While preparation threads run, the consumer must get the GIL back quickly (it feeds the GPU)."""
    import sys

    from batchvl.prepare.prefetch import GIL_SWITCH_S

    before = sys.getswitchinterval()
    assert before > GIL_SWITCH_S  # the interpreter's default, 5 ms
    (tmp_path / "a.png").write_bytes(png())
    p = Prefetcher(rows_for(["a.png"]), preparer(), lambda _: tmp_path, threads=2)
    assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_S)
    assert [type(x) for x in p] == [Request]
    p.close()
    assert sys.getswitchinterval() == pytest.approx(before)
