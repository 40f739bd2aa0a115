"""`batchvl preview JOB`: the first rows as the engine would get them, from configs and tokenizer alone."""

from __future__ import annotations

import re
import shutil

import pytest
from PIL import Image

from batchvl.cli import main

from .conftest import base_job, write_job, write_jsonl
from .test_video_messages import reference_get_index, write_video


@pytest.fixture
def no_weights(tiny_model, tmp_path):
    """The tiny checkpoint without its weight files: configs, tokenizer and the weight index only."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    assert not list(dst.glob("*.safetensors")) and (dst / "model.safetensors.index.json").is_file()
    return dst


def test_preview_shows_prompt_tiles_and_frames_without_any_weight_file(no_weights, tmp_path, capsys):
    (tmp_path / "media").mkdir()
    Image.new("RGB", (900, 500), "teal").save(tmp_path / "media" / "wide.jpg")
    Image.new("RGB", (448, 448), "navy").save(tmp_path / "media" / "square.png")
    write_video(tmp_path / "media" / "clip.mp4", frames=30, fps=10)
    rows = [{"id": "a", "prompt": "Describe <|im_end|> this.", "image": ["media/wide.jpg", "media/square.png"]},
            {"id": "v", "prompt": "What happens?", "video": "media/clip.mp4"},
            {"id": "lost", "prompt": "x", "image": "media/none.jpg"},
            {"id": "never", "prompt": "not shown: past --rows", "image": "media/wide.jpg"}]
    job = base_job(no_weights, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out",
                   media={"video_frames": 4})
    job["input"]["video_column"] = "video"
    job["engine"]["backend"] = "native"  # the backend whose plan insists on weights; preview opens none
    assert main(["preview", str(write_job(tmp_path / "job.yaml", job)), "--rows", "3", "-q"]) == 0
    out = capsys.readouterr().out
    # 16 tokens per tile in the tiny checkpoint; 900x500 is InternVL's 2x1 grid plus its thumbnail
    assert "image media/wide.jpg: 900x500, grid 2x1 + thumbnail = 3 tiles, 48 tokens" in out
    assert "image media/square.png: 448x448, grid 1x1 = 1 tiles, 16 tokens" in out
    assert re.search(r"<img><IMG_CONTEXT>×48</img>\s*<img><IMG_CONTEXT>×16</img>", out)
    assert "Describe <|im_end|> this." in out  # row text as written, not the shield's markers
    frames = reference_get_index(None, 10.0, 29, num_segments=4).tolist()  # InternVL's own choice: [3, 10, 17, 25]
    assert f"video media/clip.mp4: 4 frames of 30 at 10 fps, frames {frames}; 1 tile(s) each" in out
    assert out.count("<img><IMG_CONTEXT>×16</img>") == 5  # the square image and the four frames
    assert "Frame1: <img>" in out
    assert re.search(r"row lost .*\n  error row: media: no such file", out)
    assert "row never" not in out
    prompts = [int(n.replace(",", "")) for n in re.findall(r"prompt: ([\d,]+) tokens", out)]
    assert len(prompts) == 2 and all(p > 64 for p in prompts)


def test_preview_of_a_bad_job_file_is_one_line_and_exit_2(tmp_path, capsys):
    job = write_job(tmp_path / "job.yaml", {"model": "x", "input": {"path": "in.jsonl"}, "output": {"path": "o"},
                                            "genration": {}})
    assert main(["preview", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("batchvl: error:") and "genration" in err and "\n" not in err
