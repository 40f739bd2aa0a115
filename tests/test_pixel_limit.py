"""The default media.max_image_pixels is Pillow's own limit: a decompression bomb (a few KB of PNG declaring
240 megapixels) is an error row, refused from its header, and a folder written with the former default says
how to resume it."""

from __future__ import annotations

import json
import shlex
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchvl.cli import main
from batchvl.config.load import job_from_mapping
from batchvl.config.spec import DEFAULT_MAX_IMAGE_PIXELS, MediaSpec
from batchvl.errors import RowError
from batchvl.media.image import decode_image, decoded_size
from batchvl.run.fingerprint import resume_overrides

from .conftest import base_job, random_image, write_job, write_jsonl

REPO = Path(__file__).resolve().parents[1]
BOMB_SIZE = (16000, 15000)  # 240 million pixels: over Pillow's 178,956,970, under the former default 2^28


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG of `width` x `height` black pixels, 1 bit each, every row compressed in one zlib stream:
    tens of KB on disk, hundreds of MB decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then the row's bits
    packer = zlib.compressobj(9)
    compressed = b"".join(packer.compress(row * 1000) for _ in range(height // 1000))
    compressed += packer.compress(row * (height % 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(png_bomb(*BOMB_SIZE))
    return path


def test_the_default_is_pillows_own_error_threshold():
    # in a fresh interpreter: batchvl switches Pillow's global guard off when it is imported
    pillow = subprocess.run([sys.executable, "-c", "from PIL import Image; print(2 * Image.MAX_IMAGE_PIXELS)"],
                            capture_output=True, text=True, check=True).stdout
    assert int(pillow) == DEFAULT_MAX_IMAGE_PIXELS == MediaSpec().max_image_pixels == 178_956_970
    assert f"max_image_pixels: {DEFAULT_MAX_IMAGE_PIXELS}  #" in (REPO / "README.md").read_text()


def test_a_png_bomb_is_refused_from_its_header(bomb):
    data = bomb.read_bytes()
    assert len(data) < 64 * 1024
    why = f"media: image too large: 16000x15000 is more than media.max_image_pixels (178956970): {bomb.name}"
    for read in (decode_image, decoded_size):
        with pytest.raises(RowError) as e:
            read(data, bomb.name)
        assert str(e.value) == why


def test_refusing_the_bomb_takes_no_memory_and_the_former_default_would_have_decoded_it(bomb):
    # 400 MiB of address space: enough for Python and Pillow, not for the bomb decoded (240 MB, then RGB)
    script = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))
from batchvl.errors import RowError
from batchvl.media.image import decode_image
data = open({str(bomb)!r}, "rb").read()
for limit in ({DEFAULT_MAX_IMAGE_PIXELS}, 1 << 28):
    try:
        decode_image(data, "bomb.png", limit)
    except RowError as e:
        print("refused:", e)
    except MemoryError:
        print("out of memory")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "refused: media: image too large: 16000x15000 is more than media.max_image_pixels (178956970): bomb.png",
        "out of memory"]


def test_a_bomb_is_an_error_row_and_a_folder_of_the_former_default_says_how_to_resume(tiny_model, tmp_path, bomb,
                                                                                       capsys):
    random_image(64, 48).save(tmp_path / "ok.png")
    (tmp_path / "bomb.png").write_bytes(bomb.read_bytes())
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "ok", "prompt": "describe", "image": "ok.png"},
                                                {"id": "bomb", "prompt": "describe", "image": "bomb.png"}])
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out",
                                                    generation={"max_new_tokens": 2}))
    assert main(["run", str(job), "--quiet"]) == 0
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert out["ok"]["error"] is None
    assert out["bomb"]["error"] == ("media: image too large: 16000x15000 is more than media.max_image_pixels "
                                    f"(178956970): {tmp_path / 'bomb.png'}")

    # a folder written before the default was lowered recorded 2^28
    path = tmp_path / "out" / "_batchvl.json"
    recorded = json.loads(path.read_text())
    recorded["job"]["media.max_image_pixels"] = 1 << 28
    path.write_text(json.dumps(recorded))
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"batchvl: error: output.path: {tmp_path / 'out'} was written with a different job "
                   "(media.max_image_pixels: 268435456 (the former default) -> 178956970); to resume it as it was "
                   "written, run with --set media.max_image_pixels=268435456 (or set the same in the job file), or "
                   "use --overwrite to start over\n")
    assert main(["run", str(job), "--quiet", "--set", "media.max_image_pixels=268435456"]) == 0
    assert "0 rows ok, 0 failed, 2 already done" in capsys.readouterr().out


def test_the_resume_hint_sets_back_each_changed_setting_as_set_reads_it(tmp_path):
    old = {"model.weights": "h", "generation.top_p": 1e-05, "generation.stop": ["a b", "###"],
           "media.use_thumbnail": False, "engine.dtype": "bfloat16", "generation.seed": 3}
    new = {**old, "generation.top_p": 0.9, "generation.stop": [], "media.use_thumbnail": True,
           "engine.dtype": "float32"}
    sets = resume_overrides(old, new)
    assert sets == ["generation.top_p=1.0e-05", "'generation.stop=[\"a b\", \"###\"]'", "media.use_thumbnail=false",
                    "engine.dtype=bfloat16"]
    (tmp_path / "x.jsonl").write_text('{"p": 1}\n')
    raw = {"model": "m", "prompt": "p", "input": {"path": "x.jsonl"}, "output": {"path": "out"}}
    job = job_from_mapping(raw, tmp_path, [text for item in sets for text in shlex.split(item)])  # as the shell does
    assert (job.generation.top_p, job.generation.stop, job.media.use_thumbnail, job.engine.dtype) == \
        (1e-05, ["a b", "###"], False, "bfloat16")
    assert resume_overrides(old, {**new, "model.weights": "other"}) is None  # a different model: only --overwrite
