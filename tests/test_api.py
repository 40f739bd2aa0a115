"""LMDeploy's InternVL guide on batchvl's pipeline API.

Each example of the guide runs with only these changes: the import, the tiny model instead of InternVL2-8B,
and local files instead of URLs. Every output is checked twice: its text and token counts against
`batchvl run` over the same rows (chat-message rows, native engine), and its prompt length against a
prompt built by hand from the chat template with `<img><IMG_CONTEXT>...</img>` runs.
"""

from __future__ import annotations

import base64
import copy
import io
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchvl import BackendConfig, GenerationConfig, Response, pipeline
from batchvl.cli import main
from batchvl.media.video import frame_indices
from batchvl.vl import load_image
from batchvl.vl.constants import IMAGE_TOKEN
from batchvl.vl.utils import encode_image_base64

from .conftest import base_job, random_image, write_job, write_jsonl
from .media_server import MediaServer, Route
from .reference import reference_pixels
from .test_video_messages import write_video

BATCH = 3  # the pipeline's max_batch_size; the batched example's job uses the same
GUIDE_DEFAULT_TOKENS = 512  # LMDeploy's default max_new_tokens, which the guide's examples leave alone


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Local stand-ins for the guide's images and video."""
    folder = tmp_path_factory.mktemp("guide-media")
    random_image(900, 500, seed=1).save(folder / "tiger.jpeg", quality=95)
    random_image(640, 480, seed=2).save(folder / "human-pose.jpg", quality=95)
    random_image(300, 700, seed=3).save(folder / "det.jpg", quality=95)
    write_video(folder / "red-panda.mp4", 60)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_model):
    p = pipeline(str(tiny_model), backend_config=BackendConfig(device="cpu", dtype="float32", max_batch_size=BATCH))
    yield p
    p.close()


# ---- the two references ------------------------------------------------------------------------------------


def batchvl_run(model: Path, folder: Path, rows: list[dict], max_new_tokens: int, batch: int = 1,
                input: dict | None = None, **sections) -> dict[str, dict]:
    """`batchvl run` over chat-message rows (or the given input columns); output rows by id."""
    folder.mkdir(parents=True, exist_ok=True)
    inp = write_jsonl(folder / "rows.jsonl", rows)
    columns = input or {"messages_column": "messages", "prompt_column": None, "image_column": None}
    generation = {"max_new_tokens": max_new_tokens, **sections.pop("generation", {})}
    job = base_job(model, inp, folder / "out", engine={"backend": "native", "max_batch_size": batch},
                   input=columns, generation=generation, **sections)
    write_job(folder / "job.yaml", job)
    assert main(["run", str(folder / "job.yaml"), "--quiet"]) == 0
    return {r["id"]: r for r in pq.read_table(folder / "out").to_pylist()}


@lru_cache(maxsize=4)
def _tokenizer(model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def hand_prompt_tokens(model: Path, turns: list[dict], images: list[bytes], max_num: int) -> int:
    """The prompt length built by hand: the chat template over the turns (with `<image>` placeholders),
    each placeholder replaced by `<img>` + 16 `<IMG_CONTEXT>` per tile + `</img>`, tokenized."""
    tokenizer = _tokenizer(model)
    _, tiles = reference_pixels(images, max_num=max_num)
    rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert rendered.count("<image>") == len(tiles)
    for n in tiles:
        rendered = rendered.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (16 * n) + "</img>", 1)
    return len(tokenizer(rendered)["input_ids"])


def assert_same(response: Response, row: dict) -> None:
    assert row["error"] is None
    assert response.error is None and response.finish_reason in ("stop", "length")
    assert response.generate_token_len > 0
    assert (response.text, response.input_token_len, response.generate_token_len, response.finish_reason) == \
        (row["text"], row["prompt_tokens"], row["output_tokens"], row["finish_reason"])


def image_url(path: Path, max_dynamic_patch: int | None = None) -> dict:
    spec = {"url": str(path)} if max_dynamic_patch is None else {"max_dynamic_patch": max_dynamic_patch,
                                                                    "url": str(path)}
    return {"type": "image_url", "image_url": spec}


# ---- the guide's examples ----------------------------------------------------------------------------------


def test_single_image(pipe, tiny_model, media, tmp_path):
    image = load_image(str(media / "tiger.jpeg"))
    response = pipe(("describe this image", image))

    assert isinstance(response, Response) and response.index == 0
    rows = [{"id": "tiger", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe this image"}, image_url(media / "tiger.jpeg")]}]}]
    assert_same(response, batchvl_run(tiny_model, tmp_path, rows, GUIDE_DEFAULT_TOKENS)["tiger"])
    turns = [{"role": "user", "content": "<image>\ndescribe this image"}]
    tiger = (media / "tiger.jpeg").read_bytes()
    assert response.input_token_len == hand_prompt_tokens(tiny_model, turns, [tiger], max_num=12)


@pytest.mark.parametrize("style", ["concatenated", "independent"])
def test_multi_image_multi_turn(pipe, tiny_model, media, tmp_path, style):
    announce = f"{IMAGE_TOKEN}{IMAGE_TOKEN}\n" if style == "concatenated" else \
        f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\n"
    pose, det = media / "human-pose.jpg", media / "det.jpg"
    messages = [dict(role="user", content=[
        dict(type="text", text=f"{announce}Describe the two images in detail."),
        dict(type="image_url", image_url=dict(max_dynamic_patch=12, url=str(pose))),
        dict(type="image_url", image_url=dict(max_dynamic_patch=12, url=str(det)))])]
    out = pipe(messages, gen_config=GenerationConfig(top_k=1))
    first_turn = copy.deepcopy(messages)

    messages.append(dict(role="assistant", content=out.text))
    messages.append(dict(role="user", content="What are the similarities and differences between these two images."))
    out2 = pipe(messages, gen_config=GenerationConfig(top_k=1))

    assert len(messages) == 3 and messages[0]["content"][1]["image_url"]["url"] == str(pose)  # not changed
    got = batchvl_run(tiny_model, tmp_path, [{"id": "turn1", "messages": first_turn}, {"id": "turn2",
                                                                                      "messages": messages}],
                      GUIDE_DEFAULT_TOKENS)
    assert_same(out, got["turn1"])
    assert_same(out2, got["turn2"])

    placeholders = "<image><image>\n" if style == "concatenated" else "Image-1: <image>\nImage-2: <image>\n"
    turns = [{"role": "user", "content": placeholders + "Describe the two images in detail."}]
    images = [pose.read_bytes(), det.read_bytes()]
    assert out.input_token_len == hand_prompt_tokens(tiny_model, turns, images, max_num=12)
    turns += [{"role": "assistant", "content": out.text},
              {"role": "user", "content": "What are the similarities and differences between these two images."}]
    assert out2.input_token_len == hand_prompt_tokens(tiny_model, turns, images, max_num=12)


def test_batched_pairs(pipe, tiny_model, media, tmp_path):
    image_urls = [str(media / "tiger.jpeg"), str(media / "human-pose.jpg"), str(media / "det.jpg")]
    prompts = [("describe this image", load_image(img_url)) for img_url in image_urls]
    # Beyond the guide: the other input shapes, in one call (two engine batches of BATCH rows).
    prompts += [("caption", image_urls[0]), "Hello, who are you?",
                ("compare", [load_image(image_urls[1]), Path(image_urls[2])])]
    responses = pipe(prompts, gen_config=GenerationConfig(max_new_tokens=12))

    assert isinstance(responses, list) and [r.index for r in responses] == list(range(6))
    # The same inputs as (text, image files); `<image>\n` per image comes first when the text has none.
    inputs = [("describe this image", [u]) for u in image_urls] + [
        ("caption", image_urls[:1]), ("Hello, who are you?", []), ("compare", image_urls[1:])]
    rows = [{"id": str(i), "messages": [{"role": "user", "content": [{"type": "text", "text": text}]
                                         + [image_url(Path(u)) for u in urls]}]}
            for i, (text, urls) in enumerate(inputs)]
    got = batchvl_run(tiny_model, tmp_path, rows, 12, batch=BATCH)
    for i, (response, (text, urls)) in enumerate(zip(responses, inputs, strict=True)):
        assert_same(response, got[str(i)])
        turns = [{"role": "user", "content": "<image>\n" * len(urls) + text}]
        images = [Path(u).read_bytes() for u in urls]
        assert response.input_token_len == hand_prompt_tokens(tiny_model, turns, images, max_num=12)


def load_video(video_path, bound=None, num_segments=32):
    """The guide's decord loader, with InternVL's get_index (batchvl.media.video.frame_indices)."""
    from decord import VideoReader, cpu

    vr = VideoReader(video_path, ctx=cpu(0), num_threads=1)
    max_frame = len(vr) - 1
    fps = float(vr.get_avg_fps())
    imgs = []
    for frame_index in frame_indices(max_frame, fps, num_segments, bound):
        imgs.append(Image.fromarray(vr[frame_index].asnumpy()).convert("RGB"))
    return imgs


def test_video_recipe(pipe, tiny_model, media, tmp_path):
    video_path = str(media / "red-panda.mp4")
    imgs = load_video(video_path, num_segments=8)

    question = ""
    for i in range(len(imgs)):
        question = question + f"Frame{i + 1}: {IMAGE_TOKEN}\n"
    question += "What is the red panda doing?"
    content = [{"type": "text", "text": question}]
    for img in imgs:
        content.append({"type": "image_url", "image_url": {
            "max_dynamic_patch": 1, "url": f"data:image/jpeg;base64,{encode_image_base64(img)}"}})
    messages = [dict(role="user", content=content)]
    out = pipe(messages, gen_config=GenerationConfig(top_k=1))
    first_turn = copy.deepcopy(messages)

    messages.append(dict(role="assistant", content=out.text))
    messages.append(dict(role="user", content="Describe this video in detail. Don't miss any details."))
    out2 = pipe(messages, gen_config=GenerationConfig(top_k=1))

    got = batchvl_run(tiny_model, tmp_path / "messages", [{"id": "turn1", "messages": first_turn},
                                                          {"id": "turn2", "messages": messages}], GUIDE_DEFAULT_TOKENS)
    assert_same(out, got["turn1"])
    assert_same(out2, got["turn2"])
    # The first turn is also exactly a batchvl video row: the same frames, announced the same way.
    video = batchvl_run(tiny_model, tmp_path / "video", [{"id": "v", "prompt": "What is the red panda doing?",
                                                          "video": video_path}], GUIDE_DEFAULT_TOKENS,
                        input={"prompt_column": "prompt", "image_column": None, "video_column": "video"},
                        media={"video_frames": 8})
    assert_same(out, video["v"])

    frames = [base64.b64decode(encode_image_base64(img)) for img in imgs]
    announce = "".join(f"Frame{i + 1}: <image>\n" for i in range(8))
    turns = [{"role": "user", "content": announce + "What is the red panda doing?"}]
    assert out.input_token_len == hand_prompt_tokens(tiny_model, turns, frames, max_num=1)
    turns += [{"role": "assistant", "content": out.text},
              {"role": "user", "content": "Describe this video in detail. Don't miss any details."}]
    assert out2.input_token_len == hand_prompt_tokens(tiny_model, turns, frames, max_num=1)


# ---- generation settings -----------------------------------------------------------------------------------


def test_generation_config_maps_to_the_job_settings(pipe, tiny_model, media, tmp_path):
    pair = ("describe this image", str(media / "tiger.jpeg"))
    greedy = pipe(pair, gen_config=GenerationConfig(max_new_tokens=12))
    # As in LMDeploy: without do_sample, decoding is greedy and the repetition penalty is not applied.
    assert pipe(pair, gen_config=GenerationConfig(top_k=1, temperature=0.7, repetition_penalty=1.5,
                                                  max_new_tokens=12)).text == greedy.text
    sample = GenerationConfig(do_sample=True, top_k=40, top_p=0.9, temperature=0.9, repetition_penalty=1.1,
                              random_seed=7, max_new_tokens=12)
    sampled = pipe(pair, gen_config=sample)
    assert pipe(pair, gen_config=sample).text == sampled.text  # a seed makes it reproducible
    assert sampled.text != greedy.text
    assert pipe(pair, gen_config=GenerationConfig(max_new_tokens=12)).text == greedy.text  # greedy again
    stop = greedy.text[4:6]
    stopped = pipe(pair, gen_config=GenerationConfig(max_new_tokens=12, stop_words=[stop]))
    assert stopped.text == greedy.text[: greedy.text.find(stop)] and stopped.finish_reason == "stop"

    rows = [{"id": "0", "messages": [{"role": "user", "content": [{"type": "text", "text": pair[0]},
                                                                  image_url(Path(pair[1]))]}]}]
    job = batchvl_run(tiny_model, tmp_path, rows, 12, generation={
        "temperature": 0.9, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 7})
    assert_same(sampled, job["0"])  # the same draws: a row's seed comes from the seed and its id ("0")

    # One config per input; an input's draws depend on the seed and its position in the call.
    per_input = pipe([pair, pair, pair], gen_config=[sample, GenerationConfig(max_new_tokens=12), sample])
    assert [r.text for r in per_input[:2]] == [sampled.text, greedy.text]
    assert per_input[2].text != sampled.text
    with pytest.raises(ValueError, match="top_p"):
        pipe(pair, gen_config=GenerationConfig(do_sample=True, top_p=1.5))
    with pytest.raises(ValueError, match="skip_special_tokens"):
        pipe(pair, gen_config=GenerationConfig(skip_special_tokens=False))


def test_failed_inputs_become_error_responses(pipe, media, caplog):
    good = ("describe this image", str(media / "tiger.jpeg"))
    bad = [("describe this image", str(media / "missing.jpg")), [{"role": "assistant", "content": "Hi"}],
           ("two placeholders <image><image>", [str(media / "det.jpg")])]
    out = pipe([good, *bad], gen_config=GenerationConfig(max_new_tokens=4))
    assert out[0].error is None and out[0].text
    assert [r.finish_reason for r in out[1:]] == ["error"] * 3 and all(r.text == "" for r in out[1:])
    assert "no such file" in out[1].error and "missing.jpg" in out[1].error
    assert "last message must be the user's" in out[2].error
    assert "placeholder" in out[3].error
    assert "input 1 failed" in caplog.text
    with pytest.raises(TypeError, match="unsupported input"):
        pipe([42])
    with pytest.raises(TypeError, match="unexpected keyword"):
        pipeline("unused", session_len=4096)


# ---- images, configs, the package ------------------------------------------------------------------------


def test_load_image_reads_every_kind_of_reference(media, monkeypatch):
    path = media / "tiger.jpeg"
    expected = np.asarray(Image.open(path).convert("RGB"))
    data = path.read_bytes()
    server = MediaServer(routes={"/tiger.jpeg": Route(body=data)})
    base = server.start()
    try:
        monkeypatch.chdir(media)
        refs = [str(path), path, "tiger.jpeg", path.as_uri(), f"{base}/tiger.jpeg", data,
                "data:image/jpeg;base64," + base64.b64encode(data).decode()]
        for ref in refs:
            image = load_image(ref)
            assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected), ref
    finally:
        server.stop()
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparency on white, as batchvl decodes
    with pytest.raises(ValueError, match="no such file"):
        load_image(media / "missing.jpg")

    image = load_image(path)
    encoded = encode_image_base64(image)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded)))), expected)  # lossless
    assert Image.open(io.BytesIO(base64.b64decode(encode_image_base64(path, format="JPEG")))).format == "JPEG"
    assert IMAGE_TOKEN == "<IMAGE_TOKEN>"


def test_backend_config_reads_lmdeploy_engine_configs():
    like = SimpleNamespace(max_batch_size=2, dtype="float16", tp=1, session_len=8192, device_type="cuda")
    assert BackendConfig.of(like) == BackendConfig(max_batch_size=2, dtype="float16")
    assert BackendConfig.of(SimpleNamespace(max_batch_size=None, dtype="auto")) == BackendConfig()
    assert BackendConfig.of(None) == BackendConfig()


def test_import_batchvl_stays_light():
    code = ("import sys, batchvl; assert 'torch' not in sys.modules and 'batchvl.api' not in sys.modules; "
            "from batchvl import pipeline, GenerationConfig; assert GenerationConfig().max_new_tokens == 512")
    subprocess.run([sys.executable, "-c", code], check=True)
