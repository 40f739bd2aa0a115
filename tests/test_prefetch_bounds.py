"""The prefetcher reserves memory before it is taken: fetched bytes before reading, decoded pixels before
decoding, frames before sampling; the machine's failures stop the run instead of failing rows. Memory is
measured where it is the point: in a subprocess (its peak RSS, over its own baseline) or with tracemalloc."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from batchvl.core import Request, Result, Row
from batchvl.errors import TransientError
from batchvl.media import files
from batchvl.media.fetch import Blob, FetchSettings
from batchvl.media.video import MAX_VIDEO_FRAMES, decode_frames
from batchvl.prepare.prefetch import ByteBudget, Prefetcher

from .media_server import MediaServer, Route
from .test_prefetch import png, preparer, rows_for

MB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def peak_growth_mb(tmp_path: Path, body: str) -> dict:
    """Run `body` in a fresh Python after the prefetch imports; return what it prints as JSON, plus `growth_mb`:
    how far its peak RSS rose above the peak it had before `body` ran."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import json, resource, sys
        from pathlib import Path
        from batchvl.media.fetch import FetchSettings
        from batchvl.prepare.prefetch import ByteBudget, Prefetcher
        from tests.test_prefetch import preparer, rows_for
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {}
    """) + textwrap.dedent(body) + textwrap.dedent("""
        out["growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        print(json.dumps(out))
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_byte_budget_is_reserved_before_files_are_read(tmp_path):
    """Eight 64 MB files under a 16 MB budget: read one or two at a time (the row the consumer waits for may
    go past the budget), not all eight at once as when bytes were counted after reading."""
    for i in range(8):
        with open(tmp_path / f"{i}.png", "wb") as f:
            f.truncate(64 * MB)  # sparse zeros: not an image, so each row fails after its bytes were read
    out = peak_growth_mb(tmp_path, """
        rows = rows_for([f"{i}.png" for i in range(8)])
        pre = Prefetcher(rows, preparer(), lambda f: Path("."), max_rows=8, max_bytes=16 << 20, threads=4,
                         fetch=FetchSettings(max_media_bytes=128 << 20))
        out["errors"] = [r.error for r in pre]
        pre.close()
        out["peak_bytes"] = pre.peak_bytes
    """)
    assert len(out["errors"]) == 8 and all("not a decodable image" in e for e in out["errors"]), out["errors"]
    assert out["peak_bytes"] <= 2 * 64 * MB
    assert out["growth_mb"] < 200, out  # against 8 x 64 = 512 MB read at once before


def test_decoded_pixels_are_reserved_before_decoding(tmp_path):
    """Six small PNGs that take about 90 MB each to decode and tile, four preparation threads, a 100 MB budget:
    at most two decodes at once (one within the budget, and the row the consumer waits for), not four. Before,
    this took about 690 MB."""
    for i in range(6):
        Image.new("RGB", (4000, 4000), (i, 2 * i, 3 * i)).save(tmp_path / f"{i}.png")
    assert (tmp_path / "0.png").stat().st_size < MB
    out = peak_growth_mb(tmp_path, """
        rows = rows_for([f"{i}.png" for i in range(6)])
        pre = Prefetcher(rows, preparer(), lambda f: Path("."), max_rows=6, max_bytes=100 << 20, threads=4)
        out["kinds"] = [type(r).__name__ for r in pre]
        pre.close()
        out["peak_bytes"] = pre.peak_bytes
    """)
    assert out["kinds"] == ["Request"] * 6
    one_row = 4000 * 4000 * 6  # what decoded_size reserves for it
    assert one_row <= out["peak_bytes"] <= 100 * MB + one_row + MB
    assert out["growth_mb"] < 280, out  # two decodes and their tiling at most


def test_the_byte_budget_goes_to_the_earliest_waiting_row_first():
    """Bytes are granted in row order: a later row whose request would fit waits while an earlier one waits, and
    the earlier one gets the bytes released first. (Every release woke all waiting rows, and whichever ran first
    took the bytes: refill's 512 rows in flight filled the budget far ahead of the consumer, H200 session 10.)
    The consumer's own row still goes past the budget and the queue; a request without a row is not ordered."""
    async def scenario() -> list[str]:
        budget = ByteBudget(10)
        granted: list[str] = []

        async def ask(name: str, n: int, seq: int | None, urgent=lambda: False) -> None:
            await budget.acquire(n, urgent, seq)
            granted.append(name)

        await budget.acquire(8, seq=0)  # row 0 holds 8 of 10
        tasks = [asyncio.create_task(ask("row 2", 5, 2)), asyncio.create_task(ask("row 5", 1, 5))]
        await asyncio.sleep(0.01)
        assert granted == []  # row 5's byte would fit, but row 2 waits before it
        with pytest.raises(TimeoutError):  # a later row waits too, though its byte fits
            await asyncio.wait_for(budget.acquire(1, seq=7), 0.01)
        assert budget.try_acquire(1) is True  # never waits, so not ordered: a streaming body takes what fits
        await ask("urgent row 9", 50, 9, urgent=lambda: True)
        budget.release(8 + 1 + 50)
        await asyncio.gather(*tasks)
        return granted

    assert asyncio.run(scenario()) == ["urgent row 9", "row 2", "row 5"]


def test_a_row_that_stops_waiting_lets_the_rows_after_it_go():
    """A waiting row that is cancelled (its fetch failed) is no longer first in line: the row after it goes."""
    async def scenario() -> bool:
        budget = ByteBudget(10)
        await budget.acquire(8, seq=0)
        early = asyncio.create_task(budget.acquire(5, seq=1))
        later = asyncio.create_task(budget.acquire(1, seq=3))
        await asyncio.sleep(0.01)
        assert not later.done()  # behind row 1
        early.cancel()
        await asyncio.gather(early, return_exceptions=True)
        await asyncio.wait_for(later, 1)
        return budget.used == 9

    assert asyncio.run(scenario()) is True


def test_a_release_wakes_only_the_rows_that_may_go_not_every_waiting_row():
    """Fifty rows wait for a budget that holds one at a time; each gives its bytes back once granted. Each release
    wakes the first row in line (and an urgent one), not all fifty: waking every waiting row on every release, each
    to look again and sleep, cost a coroutine resumed per row per release on the loop's thread (1,275 wakeups
    here), holding the GIL the engine's thread needs."""
    async def scenario() -> tuple[list[int], int]:
        budget = ByteBudget(10)
        granted: list[int] = []

        async def row(seq: int, urgent=lambda: False) -> None:
            await budget.acquire(10, urgent, seq)
            granted.append(seq)
            await asyncio.sleep(0)
            budget.release(10)

        await budget.acquire(10, seq=0)
        tasks = [asyncio.create_task(row(seq)) for seq in range(1, 51)]
        await asyncio.sleep(0.01)
        assert granted == [] and budget.wakeups == 0
        budget.release(10)
        await asyncio.gather(*tasks)
        return granted, budget.wakeups

    granted, wakeups = asyncio.run(scenario())
    assert granted == list(range(1, 51))
    assert wakeups <= 2 * 50, wakeups


def test_an_image_over_max_image_pixels_fails_from_its_header_before_any_reservation(tmp_path):
    Image.new("L", (5000, 5000)).save(tmp_path / "wide.png")
    pre = Prefetcher(rows_for(["wide.png"]), preparer(max_image_pixels=1000 * 1000), lambda f: tmp_path,
                     max_bytes=MB, threads=1)
    (row,) = list(pre)
    pre.close()
    assert "image too large: 5000x5000 is more than media.max_image_pixels (1000000)" in row.error
    assert pre.peak_bytes < MB  # its 25 MB of pixels were never asked for


def test_bodies_larger_than_the_budget_wait_outside_their_connection():
    """Eight 3 MB images under a 4 MB budget, 2 HTTP slots and a slow consumer: a row whose body cannot take its
    bytes gives back its connection and slot, waits, then asks again; the row the consumer waits for always gets
    a slot, so nothing deadlocks."""
    import numpy as np

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="PNG", compress_level=1)
    body = buf.getvalue()
    assert len(body) > 2 * MB
    server = MediaServer()
    base = server.start()
    try:
        for i in range(8):
            server.routes[f"/{i}.png"] = Route(body=body)
        pre = Prefetcher(rows_for([f"{base}/{i}.png" for i in range(8)]), preparer(), lambda f: Path("."),
                         max_rows=8, max_bytes=4 * MB, threads=2, fetch=FetchSettings(http_concurrency=2))
        start = time.monotonic()
        out = []
        for row in pre:  # each row's tiles stay held until taken, so the bodies after it cannot all fit
            time.sleep(0.2)
            out.append(row)
        pre.close()
        hits = sum(route.hits for route in server.routes.values())
    finally:
        server.stop()
    assert time.monotonic() - start < 30
    assert [type(r) for r in out] == [Request] * 8
    one_row = len(body) + 1000 * 1000 * 6  # its body, and what decoding it is reserved
    assert pre.peak_bytes <= 4 * MB + one_row  # the budget, and the one row past it that the consumer waited for
    assert hits > 8  # rows did wait: they asked again once they had their bytes


def test_frames_per_video_are_capped_before_anything_is_planned_or_decoded(tmp_path):
    rows = [(Path("rows.jsonl"), Row(id="many", source="rows.jsonl:1", data={"video": "v.mp4", "n": 10 ** 8})),
            (Path("rows.jsonl"), Row(id="edge", source="rows.jsonl:2", data={"video": "nope.mp4",
                                                                             "n": MAX_VIDEO_FRAMES}))]
    tracemalloc.start()
    pre = Prefetcher(rows, preparer(image_column=None, video_column="video", video_frames_column="n"),
                     lambda f: tmp_path, threads=1)
    many, edge = list(pre)
    pre.close()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert many.error == f"input: 'n' is 100000000, more than the {MAX_VIDEO_FRAMES} frames a video may give"
    assert "no such file" in edge.error  # the cap itself is allowed
    assert peak < 20 * MB  # 10^8 "Frame{i}: <image>" lines would have been gigabytes
    with pytest.raises(Exception, match=f"more than the {MAX_VIDEO_FRAMES} a video may give"):
        decode_frames(Blob("v.mp4", data=b"not read"), MAX_VIDEO_FRAMES + 1)


# ---- the machine's failures ----------------------------------------------------------------------------------

def flaky_open(monkeypatch, times: int) -> list[int]:
    calls = [0]
    real = os.open

    def fake(path, *args, **kwargs):
        if os.fspath(path).endswith(".png"):
            calls[0] += 1
            if calls[0] <= times:
                raise OSError(errno.EMFILE, "Too many open files")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", fake)
    return calls


def test_a_passing_shortage_of_file_descriptors_costs_no_row(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(png())
    calls = flaky_open(monkeypatch, times=3)
    pre = Prefetcher(rows_for(["a.png"]), preparer(), lambda f: tmp_path, threads=1,
                     fetch=FetchSettings(machine_backoff_s=0.001))
    (row,) = list(pre)
    pre.close()
    assert isinstance(row, Request), row
    assert calls[0] == 4


def test_a_lasting_shortage_stops_the_run_instead_of_failing_rows(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "b.png").write_bytes(png())
    flaky_open(monkeypatch, times=10 ** 6)
    pre = Prefetcher(rows_for(["a.png", "b.png"]), preparer(), lambda f: tmp_path, threads=1,
                     fetch=FetchSettings(machine_backoff_s=0.001, machine_retries=3))
    seen = []
    with pytest.raises(TransientError, match="EMFILE.*ulimit -n"):
        for row in pre:
            seen.append(row)
    pre.close()
    assert seen == []  # no error row was written for it


def test_under_ulimit_n_every_row_still_succeeds(tmp_path):
    """A real descriptor limit: a child process with only a few descriptors to spare prepares 40 rows, read
    from files and over HTTP; EMFILE is met (sockets and files compete) and waited out, and every row is ok."""
    server = MediaServer()
    base = server.start()
    try:
        for i in range(20):
            server.routes[f"/{i}.png"] = Route(body=png(seed=i), delay_s=0.05)
            (tmp_path / f"{i}.png").write_bytes(png(seed=i))
        out = peak_growth_mb(tmp_path, f"""
            import os, resource
            from batchvl.media import limits
            from batchvl.core import Request
            misses = []
            machine_errno = limits.machine_errno
            limits.machine_errno = lambda e: misses.append(1) or machine_errno(e)
            import batchvl.media.fetch as fetch_module, batchvl.media.files as files_module
            fetch_module.machine_errno = files_module.machine_errno = limits.machine_errno
            refs = [f"{{i}}.png" for i in range(20)] + [f"{base}/{{i}}.png" for i in range(20)]
            pre = Prefetcher(rows_for(refs), preparer(), lambda f: Path("."), max_rows=40, threads=2,
                             fetch=FetchSettings(http_concurrency=64, machine_backoff_s=0.02, machine_retries=8))
            in_use = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 6, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            out["kinds"] = [type(r).__name__ if isinstance(r, Request) else r.error for r in pre]
            pre.close()
            out["misses"] = len(misses)
        """)
    finally:
        server.stop()
    assert out["kinds"] == ["Request"] * 40, out["kinds"]
    assert out["misses"] > 0  # the limit was really met


def test_a_row_error_is_still_a_row_error(tmp_path):
    pre = Prefetcher(rows_for(["nope.png"]), preparer(), lambda f: tmp_path, threads=1)
    (row,) = list(pre)
    pre.close()
    assert isinstance(row, Result) and row.error == f"media: no such file: {tmp_path / 'nope.png'}"
