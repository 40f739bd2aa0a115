"""Media references and decoding: each reference kind, EXIF orientation, and bad input as RowError."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from batchvl.core import RowError
from batchvl.media.image import decode_image
from batchvl.media.sources import as_reference_list, load_bytes

from .conftest import random_image


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def http_server():
    body = png(random_image(64, 48))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", body
    server.shutdown()


def test_every_reference_kind_gives_the_bytes(tmp_path, http_server):
    base, body = http_server
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(body)
    uri = "data:image/png;base64," + base64.b64encode(body).decode()
    for ref in ["sub/a.png", str(tmp_path / "sub" / "a.png"), f"file://{tmp_path}/sub/a.png", f"{base}/img.png",
                uri, body, bytearray(body), {"bytes": body, "path": "ignored.png"},
                {"bytes": None, "path": "sub/a.png"}]:
        assert load_bytes(ref, tmp_path) == body, ref


@pytest.mark.parametrize("ref,words", [
    ("nope.png", "no such file"),
    ("sub", "is a directory"),
    ("foo://host/x.png", "unsupported URL scheme 'foo'"),
    ("data:image/png;base64,@@@not-base64", "malformed base64"),
    ("data:image/png;base64", "malformed data URI"),
    ({"bytes": None, "path": None}, "neither bytes nor path"),
    (3.5, "got float"),
])
def test_bad_references_raise_row_errors(tmp_path, ref, words):
    (tmp_path / "sub").mkdir()
    with pytest.raises(RowError, match=words):
        load_bytes(ref, tmp_path)


def test_http_errors_are_row_errors(http_server):
    base, _ = http_server
    with pytest.raises(RowError, match="HTTP 404"):
        load_bytes(f"{base}/missing.png", None)
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RowError, match="cannot fetch"):
        load_bytes(f"http://127.0.0.1:{port}/x.png", None)


def test_cells_hold_one_or_many_references():
    assert as_reference_list(None) == [] and as_reference_list([]) == []
    assert as_reference_list("a.jpg") == ["a.jpg"] and as_reference_list(["a", "b"]) == ["a", "b"]


def test_exif_orientation_is_applied():
    image = random_image(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    decoded = decode_image(buf.getvalue())
    assert decoded.size == (40, 80) and decoded.mode == "RGB"


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    decoded = np.asarray(decode_image(png(rgba)))
    assert tuple(decoded[1, 1]) == (255, 255, 255) and tuple(decoded[0, 0]) == (0, 0, 255)


@pytest.mark.parametrize("data,words", [(b"", "empty file"), (b"hello, not an image", "not a decodable image")])
def test_undecodable_bytes_raise_row_errors(data, words):
    with pytest.raises(RowError, match=words):
        decode_image(data)


def test_truncated_jpeg_is_a_row_error():
    buf = io.BytesIO()
    random_image(200, 200).save(buf, format="JPEG")
    with pytest.raises(RowError, match="cannot decode"):
        decode_image(buf.getvalue()[:400])
