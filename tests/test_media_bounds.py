"""What one media item may cost: its bytes are capped (media.max_media_mb) whatever the source, odd files and
odd replies get honest row errors, and the machine's own failures (EMFILE ...) are retried, not blamed on the
row. HTTP tests talk to a 127.0.0.1 server the test starts; every test takes seconds."""

from __future__ import annotations

import base64
import errno
import json
import os
import socket
import threading
import time
import tracemalloc
import zlib

import pytest

from batchvl.errors import RowError, TransientError
from batchvl.media import files
from batchvl.media.fetch import FetchSettings, load_blob, load_bytes

MB = 1 << 20


def capped(mb: float, **overrides) -> FetchSettings:
    settings = dict(max_media_bytes=int(mb * MB), http_retries=0, http_timeout_s=10.0, machine_backoff_s=0.001)
    settings.update(overrides)
    return FetchSettings(**settings)


def peak_python_mb(fn) -> tuple[object, float]:
    """fn()'s result (or the exception it raised) and the most memory Python objects took while it ran."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as e:  # the caller looks at it
            out = e
        return out, tracemalloc.get_traced_memory()[1] / MB
    finally:
        tracemalloc.stop()


@pytest.fixture
def raw_server():
    """A 127.0.0.1 server answering each path with a function that writes raw bytes to the socket."""
    routes = {}
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(32)
    server.settimeout(0.1)
    stop = threading.Event()

    def answer(conn):
        with conn:
            conn.settimeout(10)
            try:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                routes[head.split(b" ")[1].decode()](conn, stop)
            except OSError:  # the client hung up: what some tests want
                pass

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", routes
    stop.set()
    thread.join(5)
    server.close()


def endless(conn, stop):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
    chunk, deadline = os.urandom(1 << 16), time.monotonic() + 20
    while not stop.is_set() and time.monotonic() < deadline:
        conn.sendall(chunk)


def huge_length(conn, stop):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10737418240\r\nConnection: close\r\n\r\n")
    stop.wait(10)  # and never a byte of it


def gzip_bomb(expanded_mb: int) -> bytes:
    """A gzip body of zeros: about a thousandth of the size it expands to."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MB)
    return b"".join([*(z.compress(zeros) for _ in range(expanded_mb)), z.flush()])


def replying(head: bytes, body: bytes = b""):
    def route(conn, stop):
        conn.sendall(head + body)
    return route


# ---- the cap on bytes per item -------------------------------------------------------------------------------

def test_an_endless_http_body_stops_at_the_cap(raw_server):
    base, routes = raw_server
    routes["/endless.png"] = endless
    start = time.monotonic()
    error, peak = peak_python_mb(lambda: load_bytes(f"{base}/endless.png", None, capped(2)))
    assert isinstance(error, RowError), error
    assert "endless.png is larger than media.max_media_mb (2 MB)" in str(error)
    assert time.monotonic() - start < 5
    assert peak < 8  # MB: the cap and a little, not whatever the server sent


def test_a_huge_content_length_is_refused_before_reading(raw_server):
    base, routes = raw_server
    routes["/huge.png"] = huge_length
    start = time.monotonic()
    with pytest.raises(RowError, match=r"huge.png is 10240 MB, larger than media.max_media_mb \(1 MB\)"):
        load_bytes(f"{base}/huge.png", None, capped(1))
    assert time.monotonic() - start < 3  # the server sends nothing after its headers: no read was waited for


def test_a_gzip_bomb_is_cut_off_by_its_decompressed_size(raw_server):
    base, routes = raw_server
    bomb = gzip_bomb(200)
    assert len(bomb) < MB  # 200 MB of zeros in a few hundred KB: only decompressed bytes can tell
    routes["/bomb.png"] = replying(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n"
                                   b"Content-Length: %d\r\n\r\n" % len(bomb), bomb)
    error, peak = peak_python_mb(lambda: load_bytes(f"{base}/bomb.png", None, capped(4)))
    assert isinstance(error, RowError) and "larger than media.max_media_mb (4 MB)" in str(error), error
    assert peak < 16  # MB, against 200 expanded


def test_bodies_under_the_cap_arrive_whole_compressed_or_not(raw_server):
    base, routes = raw_server
    body = os.urandom(3 * MB)
    routes["/plain"] = replying(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", body)  # no length: to the close
    packed = zlib.compress(b"abc" * MB, wbits=31)
    routes["/gzip"] = replying(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(packed), packed)
    assert load_bytes(f"{base}/plain", None, capped(4)) == body
    assert load_bytes(f"{base}/gzip", None, capped(4)) == b"abc" * MB


def test_a_local_file_over_the_cap_is_refused_from_its_size_unread(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # 1 GB, sparse: nothing on disk, and nothing may be read
    error, peak = peak_python_mb(lambda: load_bytes("big.png", tmp_path, capped(1)))
    assert isinstance(error, RowError), error
    assert str(error) == f"media: {big} is 1024 MB, larger than media.max_media_mb (1 MB)"
    assert peak < 1  # MB
    (tmp_path / "ok.png").write_bytes(b"x" * MB)
    assert load_bytes("ok.png", tmp_path, capped(1)) == b"x" * MB  # exactly the cap is allowed


def test_inline_and_fsspec_media_are_capped_too(tmp_path):
    import fsspec

    with fsspec.open("memory://bounds/big.bin", "wb") as f:
        f.write(b"\0" * (2 * MB))
    body = b"\0" * (2 * MB)
    uri = "data:image/png;base64," + base64.b64encode(body).decode()
    for ref in ["memory://bounds/big.bin", uri, body, {"bytes": body, "path": None}]:
        with pytest.raises(RowError, match=r"larger than media.max_media_mb \(1 MB\)"):
            load_bytes(ref, tmp_path, capped(1))
        assert load_bytes(ref, tmp_path, capped(2)) == body


# ---- odd files and odd replies -------------------------------------------------------------------------------

def within(seconds: float, fn):
    """fn() on a thread, failing the test if it has not returned in time (a FIFO opened for reading blocks)."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=_outcome(fn)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked"
    return out["result"]


def _outcome(fn):
    try:
        return fn()
    except Exception as e:
        return e


@pytest.mark.parametrize("read_local", [True, False])  # False: a video, whose path goes to the decoder
def test_pipes_devices_and_symlink_loops_are_not_regular_files(tmp_path, read_local):
    os.mkfifo(tmp_path / "fifo.png")
    os.symlink(tmp_path / "loop-b.png", tmp_path / "loop-a.png")
    os.symlink(tmp_path / "loop-a.png", tmp_path / "loop-b.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    expected = {"fifo.png": "not a regular file (a named pipe)", "/dev/zero": "not a regular file (a character device)",
                "loop-a.png": "not a regular file (a symlink loop)", "dangling.png": "no such file"}
    for ref, words in expected.items():
        error = within(5, lambda r=ref: load_blob(r, tmp_path, read_local, capped(1)))
        assert isinstance(error, RowError) and str(error).startswith("media: ") and words in str(error), (ref, error)


def test_a_fifo_swapped_in_after_the_stat_is_not_waited_for(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "fifo.png")
    monkeypatch.setattr(files, "regular_file_size", lambda path: 10)  # as if it had been a file when looked at
    error = within(5, lambda: files.read_file(tmp_path / "fifo.png", MB))
    assert isinstance(error, RowError) and "not a regular file (a named pipe)" in str(error)


def test_a_redirect_loop_and_a_non_http_reply_are_fetch_errors(raw_server):
    base, routes = raw_server
    routes["/loop"] = replying(b"HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n"
                               b"Connection: close\r\n\r\n")
    routes["/ssh"] = replying(b"SSH-2.0-OpenSSH_9.6\r\n")
    with pytest.raises(RowError, match=r"^http: cannot fetch .*/loop: too many redirects \(10\)$"):
        load_bytes(f"{base}/loop", None, capped(1))
    with pytest.raises(RowError, match=r"^http: cannot fetch .*/ssh: not an HTTP reply \(Bad status line"):
        load_bytes(f"{base}/ssh", None, capped(1))


# ---- the machine's failures are not the row's ----------------------------------------------------------------

def failing_open(monkeypatch, target, times: int, code: int = errno.EMFILE) -> list[int]:
    """Make os.open of `target` fail with `code` the first `times` times; returns the count of calls."""
    calls = [0]
    real = os.open

    def fake(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(target):
            calls[0] += 1
            if calls[0] <= times:
                raise OSError(code, os.strerror(code))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", fake)
    return calls


def test_running_out_of_file_descriptors_is_retried(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"png bytes")
    calls = failing_open(monkeypatch, tmp_path / "a.png", times=3)
    assert load_bytes("a.png", tmp_path, capped(1)) == b"png bytes"
    assert calls[0] == 4


@pytest.mark.parametrize("code,hint", [(errno.EMFILE, "ulimit -n"), (errno.ENOMEM, "media.prefetch_mb"),
                                       (errno.ENOSPC, "free disk space")])
def test_a_machine_error_that_persists_is_transient_not_a_row_error(tmp_path, monkeypatch, code, hint):
    (tmp_path / "a.png").write_bytes(b"png bytes")
    calls = failing_open(monkeypatch, tmp_path / "a.png", times=100, code=code)
    with pytest.raises(TransientError, match=f"{errno.errorcode[code]}.*6 times.*{hint}"):
        load_bytes("a.png", tmp_path, capped(1, machine_retries=5))
    assert calls[0] == 6
    assert not issubclass(TransientError, RowError)


def test_what_counts_as_the_machines_failure():
    import aiohttp

    from batchvl.media.limits import machine_errno, too_large

    assert machine_errno(OSError(errno.EMFILE, "Too many open files")) == errno.EMFILE
    assert machine_errno(MemoryError()) == errno.ENOMEM
    wrapped = aiohttp.ClientConnectorError(None, OSError(errno.ENFILE, "File table overflow"))
    assert machine_errno(wrapped) == errno.ENFILE
    assert machine_errno(OSError(errno.ENOENT, "No such file")) is None
    assert machine_errno(OSError(errno.ECONNREFUSED, "refused")) is None
    assert str(too_large("a.png", MB, MB + MB // 2)) == "media: a.png is 1.5 MB, larger than media.max_media_mb (1 MB)"


def test_out_of_descriptors_on_a_socket_is_retried_then_transient(raw_server, monkeypatch):
    """aiohttp wraps the socket's OSError(EMFILE) in a ClientConnectorError: still the machine's failure."""
    import aiohttp

    base, routes = raw_server
    routes["/a.png"] = replying(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n", b"png")
    failures = [2]
    real = aiohttp.TCPConnector._create_connection

    async def flaky(self, req, *args, **kwargs):
        if failures[0] > 0:
            failures[0] -= 1
            raise aiohttp.ClientConnectorError(req.connection_key, OSError(errno.EMFILE, "Too many open files"))
        return await real(self, req, *args, **kwargs)

    monkeypatch.setattr(aiohttp.TCPConnector, "_create_connection", flaky)
    assert load_bytes(f"{base}/a.png", None, capped(1)) == b"png"  # http_retries is 0: these were not retries
    failures[0] = 100
    with pytest.raises(TransientError, match="EMFILE"):
        load_bytes(f"{base}/a.png", None, capped(1, machine_retries=2))


# ---- the settings --------------------------------------------------------------------------------------------

def job_with(tmp_path, **media):
    from batchvl.config import load_job

    (tmp_path / "rows.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    (tmp_path / "job.yaml").write_text(json.dumps({
        "model": "any/model", "prompt": "Describe.", "input": {"path": "rows.jsonl"}, "output": {"path": "out"},
        "engine": {"device": "cpu"}, "media": media}))
    return load_job(tmp_path / "job.yaml")


def test_max_media_mb_and_the_frames_bound_are_checked_settings(tmp_path):
    from batchvl.config import JobError
    from batchvl.media.video import MAX_VIDEO_FRAMES

    job = job_with(tmp_path)
    assert job.media.max_media_mb == 512 == FetchSettings().max_media_bytes >> 20  # one default, in both
    assert job_with(tmp_path, max_media_mb=4, video_frames=MAX_VIDEO_FRAMES).media.max_media_mb == 4
    with pytest.raises(JobError, match=r"^media.max_media_mb: must be >= 1, got 0$"):
        job_with(tmp_path, max_media_mb=0)
    with pytest.raises(JobError, match=r"^media.max_media_mb: must be <= 65,536, got 100000$"):
        job_with(tmp_path, max_media_mb=100000)
    with pytest.raises(JobError, match=rf"^media.video_frames: must be <= {MAX_VIDEO_FRAMES:,}, got 100000000$"):
        job_with(tmp_path, video_frames=10 ** 8)
