"""Shared fixtures: a tiny real InternVL checkpoint, sample images, and job-file helpers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# CI has no GPU: Triton kernels run in Triton's interpreter, on CPU tensors. Set before anything imports them
# (the interpreter is chosen when a kernel is defined).
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import yaml
from PIL import Image

from batchvl.tools.tiny import make_tiny_model, write_fp8_dynamic


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-internvl"
    make_tiny_model(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_fp8_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny checkpoint in compressed-tensors' FP8_DYNAMIC layout: its decoder's linear weights in fp8."""
    import shutil

    path = tmp_path_factory.mktemp("models") / "tiny-internvl-fp8"
    shutil.copytree(tiny_model, path)
    write_fp8_dynamic(path)
    return path


@pytest.fixture(scope="session")
def tiny_rows(tiny_model):
    """(checkpoint, tokenizer, the sample rows of check-parity as Requests: a 7-tile image, two images, a small
    image, text only), for the engine-level tests."""
    from batchvl.models.checkpoint import CheckpointInfo, checkpoint_chat_template, load_tokenizer
    from batchvl.tools.check_parity import sample_rows

    ck = CheckpointInfo.read(tiny_model)
    tokenizer = load_tokenizer(tiny_model)
    return ck, tokenizer, sample_rows(tokenizer, checkpoint_chat_template(tiny_model, tokenizer), ck.tokens_per_tile)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise, so that resize and crop mistakes change pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (i + 1) * 255 // max(width, 1) + y * (3 - i) * 255 // max(height, 1)) % 256
                     for i in range(3)], -1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8), "RGB")


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    """A few image files of different shapes, as the tests' media root."""
    folder = tmp_path / "media"
    folder.mkdir()
    sizes = {"wide.jpg": (900, 500), "tall.png": (300, 700), "square.jpg": (448, 448), "tiny.png": (60, 40)}
    out = {}
    for i, (name, (w, h)) in enumerate(sizes.items()):
        path = folder / name
        random_image(w, h, seed=i).save(path, quality=95)
        out[name] = path
    return out


def drain_slowly(prefetcher, pause_s: float = 0.05) -> int:
    """Take every item of `prefetcher` as a slow engine would (a pause after each), close it, and return how many
    items there were: the byte-budget tests' consumer."""
    count = 0
    for _ in prefetcher:
        count += 1
        time.sleep(pause_s)
    prefetcher.close()
    return count


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def base_job(model: Path, input_path: Path, out: Path, **sections) -> dict:
    job = {
        "model": str(model),
        "input": {"path": str(input_path), "id_column": "id", "prompt_column": "prompt", "image_column": "image"},
        "output": {"path": str(out)},
        "generation": {"max_new_tokens": 12},
        "engine": {"backend": "transformers", "device": "cpu", "dtype": "float32", "max_batch_size": 3},
        # Many tests make error rows on purpose, for a run that goes on; the exit code's bound on them is
        # tested on its own (tests/test_exit_codes.py). Every row failing still exits 3.
        "run": {"max_error_fraction": 1.0},
    }
    for key, value in sections.items():
        job.setdefault(key, {}).update(value) if isinstance(value, dict) else job.__setitem__(key, value)
    return job


def make_stopper(src: Path, dst: Path) -> Path:
    """A copy of a tiny checkpoint whose LM head is zero (greedy always picks id 0, <|endoftext|>) and whose
    generation config makes id 0 an EOS id: every row stops at its first token."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    (head,) = [k for k in index if k.endswith("lm_head.weight")]
    weights = load_file(dst / index[head])
    weights[head].zero_()
    save_file(weights, dst / index[head], metadata={"format": "pt"})
    gen = json.loads((dst / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, 0]
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst


@pytest.fixture
def server():
    """A local media server (tests/media_server.py) on 127.0.0.1: (the server, its base URL)."""
    from .media_server import MediaServer

    s = MediaServer()
    base = s.start()
    yield s, base
    s.stop()
