"""output.format and the new input formats through `batchvl run` with the tiny model: OpenAI batch files in and
out, JSONL parts resumed after a kill, `batchvl export`, and a job over each new input format."""

from __future__ import annotations

import base64
import io
import json
import signal
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchvl.cli import main

from .conftest import base_job, random_image, write_job, write_jsonl
from .test_robustness import CRASH_ROWS, spawn

ENGINE = {"backend": "transformers", "device": "cpu", "dtype": "float32", "max_batch_size": 4}


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for p in sorted(out.glob("part-*.jsonl")) for x in p.read_text().splitlines()]


def data_uri(seed: int) -> str:
    buf = io.BytesIO()
    random_image(50, 40, seed).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request(custom_id: str, content, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "internvl", "messages": [{"role": "user", "content": content}], **body}}


def test_an_openai_batch_file_runs_to_openai_results_and_exports_as_one_output_and_one_error_file(
        tiny_model, tmp_path, capsys):
    picture = {"type": "image_url", "image_url": {"url": data_uri(1)}}
    requests = [request("txt", "Say something.", max_tokens=3),
                request("img", [{"type": "text", "text": "What is this?"}, picture], temperature=0),
                request("txt", "a duplicate"),
                request("hot", "hi", temperature=0.9)]
    inp = tmp_path / "batch.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in requests) + "not json\n")
    job = write_job(tmp_path / "job.yaml", {
        "model": str(tiny_model), "input": {"path": str(inp), "format": "openai-batch"},
        "output": {"path": str(tmp_path / "out"), "format": "openai-batch"},
        "generation": {"max_new_tokens": 6}, "engine": ENGINE, "run": {"max_error_fraction": 1.0}})
    assert main(["run", str(job), "--quiet"]) == 0
    got = {x["custom_id"]: x for x in lines(tmp_path / "out")}
    assert sorted(got) == ["batch.jsonl:5", "hot", "img", "txt", "txt#dup@batch.jsonl:3"]
    body = got["txt"]["response"]["body"]
    assert got["txt"]["error"] is None and got["txt"]["id"].startswith("batch_req_")
    assert got["txt"]["response"]["status_code"] == 200 and body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] <= 3 and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert isinstance(body["choices"][0]["message"]["content"], str) and body["model"] == str(tiny_model)
    assert got["img"]["response"]["body"]["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]  # its tiles
    assert got["hot"]["response"] is None and got["hot"]["error"]["code"] == "input"
    assert "sets temperature 0.9" in got["hot"]["error"]["message"]
    assert "not valid JSON" in got["batch.jsonl:5"]["error"]["message"]

    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 0
    assert "0 rows ok, 0 failed, 5 already done" in capsys.readouterr().out
    assert main(["run", str(job), "--quiet", "--retry-errors"]) == 0  # error rows of a JSONL part run again
    assert sorted(x["custom_id"] for x in lines(tmp_path / "out")) == sorted(got)

    assert main(["export", str(tmp_path / "out"), "-o", str(tmp_path / "results.jsonl"),
                 "--errors", str(tmp_path / "errors.jsonl")]) == 0
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["img", "txt"]
    assert sorted(r["custom_id"] for r in errors) == ["batch.jsonl:5", "hot", "txt#dup@batch.jsonl:3"]
    exported = {r["custom_id"]: r for r in results}["txt"]
    for line in (exported, got["txt"]):
        line["response"]["body"].pop("created")  # when the line was written
    assert exported == got["txt"]


def test_jsonl_output_resumes_after_kill_9_with_every_row_once(tiny_model, tmp_path):
    inp = write_jsonl(tmp_path / "rows.jsonl", CRASH_ROWS)
    job = write_job(tmp_path / "job.yaml", base_job(
        tiny_model, inp, tmp_path / "out", input={"image_column": None}, output={"rows_per_file": 2,
                                                                                 "format": "jsonl"},
        generation={"max_new_tokens": 4}, engine={"max_batch_size": 2}))
    proc = spawn(job, "kill:write:2")  # killed before the second part is renamed into place
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert [x["id"] for x in lines(tmp_path / "out")] == ["r00", "r01"]
    assert list((tmp_path / "out").glob(".tmp-*~part-*.jsonl"))
    assert main(["run", str(job), "--quiet"]) == 0
    ids = [x["id"] for x in lines(tmp_path / "out")]
    assert sorted(ids) == [r["id"] for r in CRASH_ROWS] and not list((tmp_path / "out").glob(".tmp-*"))
    first = lines(tmp_path / "out")[0]
    assert list(first)[:6] == ["id", "text", "error", "finish_reason", "prompt_tokens", "output_tokens"]
    assert main(["run", str(job), "--quiet", "--set", "output.format=parquet"]) == 2  # one folder, one format


def shard(path: Path, samples: list[tuple[str, bytes, str]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for ext, data in (("png", image), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    random_image(48, 36, seed).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def inputs(tmp_path) -> dict[str, tuple[Path, dict, list[str]]]:
    """Per input format: (input.path, more input keys, the ids its rows get)."""
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    random_image(60, 40, 0).save(media / "a.png")
    random_image(40, 60, 1).save(media / "sub" / "b.jpg")
    (tmp_path / "rows.csv").write_text("id,prompt\nx,Say hi.\ny,\"Say, \"\"bye\"\".\"\n")
    shard(tmp_path / "000.tar", [("k1", png(2), "a cat"), ("k2", b"not an image", "a dog")])
    return {
        "media": (media, {}, ["a.png", "sub/b.jpg"]),
        "csv": (tmp_path / "rows.csv", {"id_column": "id", "prompt_column": "prompt"}, ["x", "y"]),
        "webdataset": (tmp_path / "000.tar", {}, ["000.tar:k1", "000.tar:k2"]),
    }


@pytest.mark.parametrize("fmt", ["media", "csv", "webdataset"])
def test_each_new_input_format_runs_through_a_job(tiny_model, tmp_path, inputs, fmt):
    path, keys, ids = inputs[fmt]
    job = write_job(tmp_path / "job.yaml", {
        "model": str(tiny_model), "prompt": "Describe {txt}." if fmt == "webdataset" else "Describe.",
        "input": {"path": str(path), **keys}, "output": {"path": str(tmp_path / "out")},
        "generation": {"max_new_tokens": 3}, "engine": ENGINE, "run": {"max_error_fraction": 1.0}})
    assert main(["run", str(job), "--quiet"]) == 0
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(rows) == ids
    if fmt == "webdataset":  # the second sample's image member is not an image: its row alone fails
        assert rows["000.tar:k1"]["error"] is None and rows["000.tar:k2"]["error"].startswith("media:")
        assert rows["000.tar:k1"]["prompt_tokens"] > 100  # the image's tiles are in the prompt
    else:
        assert all(r["error"] is None and r["text"] is not None for r in rows.values())
    if fmt == "media":
        assert min(r["prompt_tokens"] for r in rows.values()) > 100
