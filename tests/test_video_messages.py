"""Video rows (frames sampled the InternVL way) and chat-message rows, end to end on the tiny model."""

from __future__ import annotations

import builtins
import json

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchvl.cli import main
from batchvl.errors import RowError
from batchvl.media.fetch import Blob
from batchvl.media.video import decode_frames, frame_indices

from .conftest import base_job, write_job, write_jsonl
from .reference import reference_generate


def reference_get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    # Restated from InternVL's published video recipe.
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return np.array([int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)])


def write_video(path, frames: int, fps: int = 10, size=(96, 64)) -> None:
    """Frame i is a flat grey of level 10*i (up to 25 frames), so a decoded frame tells which index it was."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), (10 * i) % 256, np.uint8), "rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("frames,fps,segments,bound", [
    (30, 10.0, 8, None), (300, 29.97, 8, None), (7, 25.0, 8, None), (100, 10.0, 4, (1.0, 5.0)),
    (100, 10.0, 16, (0.0, 100.0)), (1, 30.0, 8, None), (250, 24.0, 32, (2.5, 3.5)),
])
def test_frame_indices_follow_the_published_formula(frames, fps, segments, bound):
    got = frame_indices(frames - 1, fps, segments, bound)
    assert got == reference_get_index(bound, fps, frames - 1, num_segments=segments).tolist()


def test_decord_samples_the_right_frames(tmp_path):
    write_video(tmp_path / "v.mp4", 24)
    images = decode_frames(Blob("v.mp4", path=tmp_path / "v.mp4"), 8)
    levels = [round(float(np.asarray(im).mean()) / 10) for im in images]
    assert levels == frame_indices(23, 10.0, 8)


def test_pyav_is_the_fallback_without_decord(tmp_path, monkeypatch):
    write_video(tmp_path / "v.mp4", 24)
    real_import = builtins.__import__

    def no_decord(name, *args, **kwargs):
        if name == "decord":
            raise ImportError("no decord")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_decord)
    images = decode_frames(Blob("v.mp4", data=(tmp_path / "v.mp4").read_bytes()), 8)
    assert [round(float(np.asarray(im).mean()) / 10) for im in images] == frame_indices(23, 10.0, 8)


def test_neither_decoder_gives_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def none(name, *args, **kwargs):
        if name in ("decord", "av"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", none)
    with pytest.raises(RowError, match="video needs decord"):
        decode_frames(Blob("v.mp4", data=b"x"), 8)


def test_video_row_announces_frames_and_counts_them(tiny_model, tmp_path):
    write_video(tmp_path / "clip.mp4", 60)
    (tmp_path / "empty.mp4").write_bytes(b"")
    rows = [{"id": "clip", "prompt": "What happens?", "video": "clip.mp4"},
            {"id": "four", "prompt": "<video>Summarise.", "video": "clip.mp4", "nframes": 4, "bound": [1.0, 4.0]},
            {"id": "broken", "prompt": "What happens?", "video": "empty.mp4"},
            {"id": "missing", "prompt": "What happens?", "video": "nope.mp4"}]
    inp = write_jsonl(tmp_path / "rows.jsonl", rows)
    job = base_job(tiny_model, inp, tmp_path / "out", engine={"backend": "native"},
                   input={"image_column": None, "video_column": "video", "video_frames_column": "nframes",
                          "video_bound_column": "bound"})
    write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert out["clip"]["error"] is None and out["four"]["error"] is None
    # The reference: the frames as images (one tile each) announced as Frame{i}: <image>.
    frames = decode_frames(Blob("clip.mp4", path=tmp_path / "clip.mp4"), 8)
    data = [png_bytes(f) for f in frames]
    text = "".join(f"Frame{i + 1}: <image>\n" for i in range(8)) + "What happens?"
    ref_text, ref_tokens, _ = reference_generate(tiny_model, text, data, 12, max_num=1)
    assert (out["clip"]["text"], out["clip"]["prompt_tokens"]) == (ref_text, ref_tokens)
    four = decode_frames(Blob("clip.mp4", path=tmp_path / "clip.mp4"), 4, (1.0, 4.0))
    text = "".join(f"Frame{i + 1}: <image>\n" for i in range(4)) + "Summarise."
    ref_text, ref_tokens, _ = reference_generate(tiny_model, text, [png_bytes(f) for f in four], 12, max_num=1)
    assert (out["four"]["text"], out["four"]["prompt_tokens"]) == (ref_text, ref_tokens)
    assert "cannot decode video" in out["broken"]["error"] or "no frames" in out["broken"]["error"]
    assert "no such file" in out["missing"]["error"]


def png_bytes(image: Image.Image) -> bytes:
    """A decoded frame as PNG bytes: the reference side takes each frame as an image file."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_message_rows_single_and_multi_turn(tiny_model, images, tmp_path):
    from transformers import AutoTokenizer

    from .reference import reference_pixels

    wide, tall = str(images["wide.jpg"]), str(images["tall.png"])
    rows = [
        {"id": "single", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Describe this image."},
            {"type": "image_url", "image_url": {"url": wide}}]}]},
        {"id": "as-prompt", "prompt": "Describe this image.", "image": wide},
        {"id": "multi", "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "<IMAGE_TOKEN><IMAGE_TOKEN>\nDescribe the two images."},
                {"type": "image_url", "image_url": {"max_dynamic_patch": 2, "url": wide}},
                {"type": "image_url", "image_url": {"max_dynamic_patch": 2, "url": tall}}]},
            {"role": "assistant", "content": "Two pictures."},
            {"role": "user", "content": "What differs?"}]},
        {"id": "bad-order", "messages": [{"role": "assistant", "content": "Hi"}]},
    ]
    inp = write_jsonl(tmp_path / "rows.jsonl", rows)
    for name, inputs in (("msgs", {"messages_column": "messages", "prompt_column": None, "image_column": None}),
                         ("plain", {})):
        job = base_job(tiny_model, inp, tmp_path / name, engine={"backend": "native"}, input=inputs)
        write_job(tmp_path / f"{name}.yaml", job)
        assert main(["run", str(tmp_path / f"{name}.yaml"), "--quiet"]) == 0
    msgs = {r["id"]: r for r in pq.read_table(tmp_path / "msgs").to_pylist()}
    plain = {r["id"]: r for r in pq.read_table(tmp_path / "plain").to_pylist()}
    assert msgs["single"]["text"] == plain["as-prompt"]["text"]
    assert msgs["single"]["prompt_tokens"] == plain["as-prompt"]["prompt_tokens"]
    assert "last message must be the user's" in msgs["bad-order"]["error"]

    # The multi-turn prompt, built by hand: the chat template over all turns, images in order.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    _, counts = reference_pixels([images["wide.jpg"].read_bytes(), images["tall.png"].read_bytes()], max_num=2)
    turns = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "<image><image>\nDescribe the two images."},
             {"role": "assistant", "content": "Two pictures."}, {"role": "user", "content": "What differs?"}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    for n in counts:
        rendered = rendered.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (16 * n) + "</img>", 1)
    assert msgs["multi"]["prompt_tokens"] == len(tokenizer(rendered)["input_ids"])
    assert msgs["multi"]["error"] is None


def test_messages_column_may_hold_json_text(tiny_model, tmp_path):
    messages = json.dumps([{"role": "user", "content": "Hello"}])
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "messages": messages}, {"id": "b", "messages": "{x"}])
    job = base_job(tiny_model, inp, tmp_path / "out", engine={"backend": "native"},
                   input={"messages_column": "messages", "prompt_column": None, "image_column": None})
    write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert out["a"]["error"] is None and "not JSON" in out["b"]["error"]
