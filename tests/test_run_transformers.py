"""`batchvl run` on the tiny model with the transformers backend equals transformers' greedy output."""

from __future__ import annotations

import base64
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchvl.cli import main

from .conftest import base_job, make_stopper, random_image, write_job, write_jsonl
from .reference import reference_generate, reference_prompt


def read_output(out) -> dict[str, dict]:
    table = pq.read_table(out)
    return {r["id"]: r for r in table.to_pylist()}


def png_bytes(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    random_image(w, h, seed).save(buf, format="PNG")
    return buf.getvalue()


def rows_with_every_shape(images) -> list[dict]:
    return [
        {"id": "single", "prompt": "Describe this image.", "image": "wide.jpg"},
        {"id": "placeholder", "prompt": "Look: <image>\nWhat is it?", "image": "tall.png"},
        {"id": "multi", "prompt": "Image-1: <image>\nImage-2: <image>\nCompare them.",
         "image": ["square.jpg", "tiny.png"]},
        {"id": "multi-implicit", "prompt": "Two images.", "image": ["tiny.png", "wide.jpg"]},
        {"id": "lmdeploy-token", "prompt": "<IMAGE_TOKEN>\nCaption.", "image": "square.jpg"},
        {"id": "text-only", "prompt": "Say something about tiles.", "image": None},
        {"id": "absolute", "prompt": "Describe.", "image": str(images["tall.png"])},
    ]


def expected_for(model, row, images, max_new_tokens=12):
    refs = row["image"] if isinstance(row["image"], list) else [row["image"]] if row["image"] else []
    data = [images[r].read_bytes() if r in images else open(r, "rb").read() for r in refs]
    text = row["prompt"].replace("<IMAGE_TOKEN>", "<image>")
    return reference_generate(model, text, data, max_new_tokens)


def test_jsonl_run_matches_transformers_generate(tiny_model, images, tmp_path):
    rows = rows_with_every_shape(images)
    inp = write_jsonl(images["wide.jpg"].parent / "rows.jsonl", rows)
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out"))
    assert main(["run", str(job), "--quiet"]) == 0
    out = read_output(tmp_path / "out")
    assert set(out) == {r["id"] for r in rows}
    for row in rows:
        text, prompt_tokens, output_tokens = expected_for(tiny_model, row, images)
        got = out[row["id"]]
        assert got["error"] is None, got
        assert got["text"] == text, row["id"]
        assert got["prompt_tokens"] == prompt_tokens, row["id"]
        assert got["output_tokens"] == output_tokens, row["id"]
        assert got["finish_reason"] == ("stop" if output_tokens < 12 else "length")
    # The images reach the model: rows that differ only in their image differ in text.
    assert out["single"]["text"] != out["lmdeploy-token"]["text"] != out["absolute"]["text"]


def test_parquet_with_bytes_and_image_structs_matches(tiny_model, tmp_path):
    a, b, c = png_bytes(700, 300, 1), png_bytes(200, 450, 2), png_bytes(448, 448, 3)
    table = pa.table({
        "key": ["raw-bytes", "struct", "struct-list", "none"],
        "question": ["Describe.", "What is shown?", "<image>\nand\n<image>\ncompare", "Hello."],
        "img": pa.array([
            [{"bytes": a, "path": None}],
            [{"bytes": b, "path": "b.png"}],
            [{"bytes": c, "path": None}, {"bytes": a, "path": None}],
            [],
        ], type=pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        "raw": [a, None, None, None],
    })
    pq.write_table(table, tmp_path / "rows.parquet")
    job = base_job(tiny_model, tmp_path / "rows.parquet", tmp_path / "out",
                   input={"id_column": "key", "prompt_column": "question", "image_column": "img"},
                   output={"keep_columns": ["question"]})
    write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    out = read_output(tmp_path / "out")
    expected = {"raw-bytes": [a], "struct": [b], "struct-list": [c, a], "none": []}
    questions = dict(zip(table["key"].to_pylist(), table["question"].to_pylist(), strict=True))
    for key, data in expected.items():
        text, prompt_tokens, _ = reference_generate(tiny_model, questions[key], data, 12)
        assert out[key]["text"] == text and out[key]["prompt_tokens"] == prompt_tokens, key
        assert out[key]["question"] == questions[key]

    # The same rows with a bare-bytes column give the same text as the struct column.
    job["input"]["image_column"] = "raw"
    job["output"]["path"] = str(tmp_path / "out-raw")
    write_job(tmp_path / "job2.yaml", job)
    assert main(["run", str(tmp_path / "job2.yaml"), "--quiet"]) == 0
    assert read_output(tmp_path / "out-raw")["raw-bytes"]["text"] == out["raw-bytes"]["text"]


def test_rendered_prompt_is_the_published_chat_format(tiny_model):
    from transformers import AutoTokenizer

    from batchvl.prepare.prompt import PromptBuilder
    from batchvl.tools.tiny import SYSTEM_MESSAGE

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    builder = PromptBuilder(tokenizer, tokenizer.chat_template, tokens_per_tile=16)
    expected = (f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n"
                f"<img>{'<IMG_CONTEXT>' * 32}</img>\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert builder.expand(builder.render("<image>\nhi"), [2]) == expected
    assert builder.encode("<image>\nhi", [2]) == tokenizer(reference_prompt(tokenizer, "<image>\nhi", [2]))["input_ids"]


def test_data_uri_rows_match_path_rows(tiny_model, images, tmp_path):
    uri = "data:image/png;base64," + base64.b64encode(images["tall.png"].read_bytes()).decode()
    rows = [{"id": "uri", "prompt": "Describe.", "image": uri},
            {"id": "path", "prompt": "Describe.", "image": "tall.png"}]
    inp = write_jsonl(images["tall.png"].parent / "uri.jsonl", rows)
    write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out"))
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    out = read_output(tmp_path / "out")
    assert out["uri"]["text"] == out["path"]["text"] and out["uri"]["error"] is None


@pytest.mark.parametrize("max_patch", [1, 2])
def test_max_dynamic_patch_from_job_and_from_row(tiny_model, images, tmp_path, max_patch):
    rows = [{"id": "job-level", "prompt": "Describe.", "image": "wide.jpg"},
            {"id": "row-level", "prompt": "Describe.", "image": "wide.jpg", "mdp": 6}]
    inp = write_jsonl(images["wide.jpg"].parent / "mdp.jsonl", rows)
    job = base_job(tiny_model, inp, tmp_path / "out", media={"max_dynamic_patch": max_patch},
                   input={"max_dynamic_patch_column": "mdp"})
    write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    out = read_output(tmp_path / "out")
    data = [images["wide.jpg"].read_bytes()]
    for key, limit in (("job-level", max_patch), ("row-level", 6)):
        text, prompt_tokens, _ = reference_generate(tiny_model, "Describe.", data, 12, max_num=limit)
        assert (out[key]["text"], out[key]["prompt_tokens"]) == (text, prompt_tokens), key


def test_generation_config_eos_stops_the_row(tiny_model, tmp_path):
    """A checkpoint whose generation config adds an EOS id that the model always emits first stops at once."""
    model = make_stopper(tiny_model, tmp_path / "stopper")
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hi"}])
    write_job(tmp_path / "job.yaml", base_job(model, inp, tmp_path / "out", input={"image_column": None}))
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    row = read_output(tmp_path / "out")["a"]
    assert (row["text"], row["finish_reason"], row["output_tokens"], row["error"]) == ("", "stop", 1, None)
