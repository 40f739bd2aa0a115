"""Media references and decoding: each reference kind, EXIF orientation, and bad input as RowError."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchvl.errors import RowError
from batchvl.media.fetch import load_bytes
from batchvl.media.image import decode_image
from batchvl.media.sources import as_reference_list

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


def _odd_images(folder) -> dict[str, str]:
    """Image files that are unusual but valid; each must caption normally."""
    base = random_image(120, 80)
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).save(folder / "gray16.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))
    red.save(folder / "anim.gif", save_all=True, append_images=[blue], duration=100, loop=0)
    red.save(folder / "pages.tiff", save_all=True, append_images=[blue])
    exif = Image.Exif()
    exif[0x0112] = 8
    base.save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "one.png")
    return {p.stem: p.name for p in folder.iterdir()}


def test_odd_but_valid_images_decode(tmp_path):
    files = _odd_images(tmp_path)
    for name in files.values():
        image = decode_image((tmp_path / name).read_bytes(), name)
        assert image.mode == "RGB" and image.width >= 1
    assert decode_image((tmp_path / "anim.gif").read_bytes()).getpixel((5, 5)) == (255, 0, 0)  # first frame
    assert decode_image((tmp_path / "pages.tiff").read_bytes()).getpixel((5, 5)) == (255, 0, 0)  # first page
    assert decode_image((tmp_path / "rotated.jpg").read_bytes()).size == (80, 120)
    gray = np.asarray(decode_image((tmp_path / "gray16.png").read_bytes()))
    assert 20 < gray.mean() < 235  # scaled from 16 bits, not clipped to white


def test_bad_and_odd_media_in_one_run(tiny_model, tmp_path):
    import json as _json

    from batchvl.cli import main

    from .conftest import base_job, write_job, write_jsonl

    media = tmp_path / "media"
    media.mkdir()
    odd = _odd_images(media)
    (media / "empty.jpg").write_bytes(b"")
    (media / "text.jpg").write_text("not an image")
    buf = io.BytesIO()
    random_image(300, 300).save(buf, format="JPEG")
    (media / "truncated.jpg").write_bytes(buf.getvalue()[:500])
    random_image(300, 300).save(media / "big.png")
    (media / "folder").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/x.png"
    import fsspec

    with fsspec.open("memory://bucket/mem.png", "wb") as f:
        f.write(png(random_image(50, 50)))
    bad = {"missing": "nope.jpg", "empty": "empty.jpg", "truncated": "truncated.jpg", "text": "text.jpg",
           "bomb": "big.png", "refused": refused, "scheme": "foo://x/y.png", "datauri": "data:image/png;base64,!!",
           "number": 42, "directory": "folder", "s3": "s3://bucket/key.png"}
    rows = [{"id": k, "prompt": "Describe.", "image": v} for k, v in {**odd, **bad}.items()]
    rows += [{"id": "memory", "prompt": "Describe.", "image": "memory://bucket/mem.png"},
             {"id": "list", "prompt": "Describe.", "image": ["one.png", "nope.jpg"]}]
    inp = write_jsonl(media / "rows.jsonl", rows)
    job = base_job(tiny_model, inp, tmp_path / "out", engine={"backend": "native"},
                   media={"max_image_pixels": 300 * 300 - 1, "http_retries": 0})
    write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert len(out) == len(rows)
    for key in [*odd, "memory"]:
        assert out[key]["error"] is None and out[key]["text"] is not None, (key, out[key]["error"])
    expected = {"missing": "no such file", "empty": "empty file", "truncated": "cannot decode",
                "text": "not a decodable image", "bomb": "image too large", "refused": "connection refused",
                "scheme": "unsupported URL scheme 'foo'", "datauri": "malformed base64", "number": "holds a int",
                "directory": "is a directory", "s3": "s3fs", "list": "no such file"}
    for key, words in expected.items():
        assert words in (out[key]["error"] or ""), (key, out[key]["error"])
        assert out[key]["finish_reason"] == "error"
    _json.dumps(out["s3"]["error"])  # a plain string
