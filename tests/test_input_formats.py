"""input.format: each reader streams its records with stable ids, and a bad record becomes an error row while the
records after it are read. Readers are tested directly, without a model (tests/test_output_formats.py runs jobs)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
import zstandard

from batchvl.config import job_from_mapping
from batchvl.errors import JobError
from batchvl.io.ids import Ids
from batchvl.io.openai_batch import chat_request_to_row, sampling_conflict
from batchvl.io.readers import columns_of, count_rows, read_rows
from batchvl.run.output import pending_rows

from .conftest import random_image, write_jsonl


def rows_of(job) -> list:
    return [r for _, r in read_rows(job.input.files, Ids.of(job))]


def job_for(tmp_path: Path, path, prompt="Describe.", **input_keys):
    raw = {"model": "m", "prompt": prompt, "input": {"path": str(path), **input_keys},
           "output": {"path": str(tmp_path / "out")}}
    return job_from_mapping(raw, tmp_path)


def request(custom_id, content="hi", **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body}}


# ---- OpenAI batch requests ------------------------------------------------------------------------------


def test_openai_batch_lines_become_rows_keyed_by_custom_id_and_bad_lines_error_rows(tmp_path):
    path = tmp_path / "batch.jsonl"
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
    lines = [request("a", [{"type": "text", "text": "what is it"}, image], max_completion_tokens=5),
             request("b", max_tokens=7, temperature=0, stop="END"),
             request("a", "again"),  # a duplicate custom_id
             {**request("c"), "url": "/v1/embeddings"},
             request("d", logit_bias={"1": 2}),
             request(None),
             request("e", max_tokens=0)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{cut off\n")
    job = job_for(tmp_path, path, format="openai-batch")
    assert (job.input.id_column, job.input.messages_column, job.input.max_new_tokens_column) == \
        ("custom_id", "messages", "max_tokens")
    rows = rows_of(job)
    assert [r.id for r in rows] == ["a", "b", "a", "c", "d", "batch.jsonl:6", "e", "batch.jsonl:8"]
    assert rows[0].data["messages"] == lines[0]["body"]["messages"] and rows[0].data["max_tokens"] == 5
    assert rows[1].data["max_tokens"] == 7 and rows[1].data["sampling"] == {"temperature": 0, "stop": "END"}
    assert "only POST /v1/chat/completions" in rows[3].error and rows[3].data is None
    assert "body.logit_bias" in rows[4].error
    assert "no value in id column 'custom_id'" in rows[5].error
    assert "body.max_tokens must be an integer >= 1" in rows[6].error
    assert "not valid JSON" in rows[7].error
    pending = [r for _, r in pending_rows(job.input.files, Ids.of(job), set())]
    assert pending[2].id == "a#dup@batch.jsonl:3" and "duplicate id 'a'" in pending[2].error
    assert count_rows(job.input.files, "openai-batch") == 8


def test_a_request_may_repeat_the_jobs_sampling_settings_but_not_change_them():
    job = {"temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": ["END"]}
    assert sampling_conflict({"temperature": 0, "top_p": 1, "stop": "END", "n": 1, "seed": 5}, job) is None
    why = sampling_conflict({"temperature": 0.7}, job)
    assert why.startswith("input: the request sets temperature 0.7") and "generation.temperature 0.0" in why
    assert "presence_penalty" in sampling_conflict({"presence_penalty": 0.5}, job)
    assert "seed" in sampling_conflict({"seed": 5}, {**job, "temperature": 0.8})  # sampling: the seed matters
    row, why = chat_request_to_row({"custom_id": "x", "body": {"messages": [], "stream": True}})
    assert row == {"custom_id": "x"} and "body.stream" in why


def test_openai_batch_input_refuses_columns_its_lines_carry_themselves(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [request("a")])
    with pytest.raises(JobError, match=r"^input.prompt_column: not used with input.format openai-batch"):
        job_for(tmp_path, path, format="openai-batch", prompt_column="p")


# ---- compressed JSONL -----------------------------------------------------------------------------------


def test_gzip_and_zstd_jsonl_read_as_the_plain_file_and_a_cut_short_one_ends_in_one_error_row(tmp_path):
    records = [{"id": i, "prompt": f"p{i}"} for i in range(500)]
    plain = write_jsonl(tmp_path / "rows.jsonl", records).read_bytes()
    (tmp_path / "gz").mkdir()
    (tmp_path / "zst").mkdir()
    (tmp_path / "gz" / "rows.jsonl.gz").write_bytes(gzip.compress(plain))
    (tmp_path / "zst" / "rows.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    want = [(r.id, r.data) for r in rows_of(job_for(tmp_path, tmp_path / "rows.jsonl", id_column="id"))]
    for folder in ("gz", "zst"):
        job = job_for(tmp_path, tmp_path / folder, id_column="id")
        assert [(r.id, r.data) for r in rows_of(job)] == want
        assert count_rows(job.input.files) == 500 and columns_of(job.input.files[0]) == {"id", "prompt"}
    cut = tmp_path / "cut" / "rows.jsonl.gz"
    cut.parent.mkdir()
    cut.write_bytes(gzip.compress(plain)[:900])
    rows = rows_of(job_for(tmp_path, cut, id_column="id"))
    assert all(r.error is None for r in rows[:-1]) and len(rows) > 10
    assert rows[-1].id == f"rows.jsonl.gz:{len(rows)}" and "cut short or corrupt" in rows[-1].error


# ---- CSV and TSV ----------------------------------------------------------------------------------------


def test_csv_and_tsv_records_are_rows_of_strings_and_a_bad_record_is_an_error_row(tmp_path):
    (tmp_path / "rows.csv").write_text('id,prompt,image\n1,"say ""hi"", then\nstop",a.jpg\n2,short\n'
                                       '3,too,many,fields\n\n4,last,c.jpg\n', encoding="utf-8")
    job = job_for(tmp_path, tmp_path / "rows.csv", id_column="id", prompt_column="prompt")
    rows = rows_of(job)
    assert [r.id for r in rows] == ["1", "2", "rows.csv:3", "4"]
    assert rows[0].data == {"id": "1", "prompt": 'say "hi", then\nstop', "image": "a.jpg"}
    assert rows[1].data == {"id": "2", "prompt": "short", "image": None}
    assert "has 4 fields, more than the header's 3" in rows[2].error
    assert count_rows(job.input.files) == 4 and columns_of(job.input.files[0]) == {"id", "prompt", "image"}
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "rows.tsv").write_text("prompt\timage\nhello, world\tx.png\n", encoding="utf-8")
    (row,) = rows_of(job_for(tmp_path, tmp_path / "t"))
    assert row.id == "rows.tsv:1" and row.data == {"prompt": "hello, world", "image": "x.png"}


def test_a_csv_line_over_the_bound_is_skipped_in_bounded_memory(tmp_path, monkeypatch):
    import batchvl.io.tabular as tabular

    monkeypatch.setattr(tabular, "MAX_LINE_BYTES", 1000)
    (tmp_path / "rows.csv").write_text("prompt\nok\n" + "x" * 5000 + "\nafter\n")
    rows = rows_of(job_for(tmp_path, tmp_path / "rows.csv"))
    assert [r.data for r in rows] == [{"prompt": "ok"}, None, {"prompt": "after"}]
    assert "longer than 1000 bytes" in rows[1].error and rows[1].id == "rows.csv:2"


# ---- WebDataset shards ----------------------------------------------------------------------------------


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    random_image(40, 30, seed).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_samples_group_members_by_key_and_a_bad_sample_is_an_error_row(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "000.tar", [
        {"__key__": "s/001", "jpg": png_bytes(1), "txt": b"a red cat", "json": b'{"question": "what?"}',
         "cls": b"3"},
        {"__key__": "s/002", "png": png_bytes(2), "txt": b"a dog"},
        {"__key__": "s/003", "jpg": png_bytes(3), "json": b"{broken"},
        {"__key__": "s/004", "txt": b"text only"},
    ])
    write_shard(shards / "001.tar", [{"__key__": "t/001", "mp4": b"not really a video", "txt": b"clip"}])
    job = job_for(tmp_path, shards, prompt="Caption: {txt}")
    assert (job.input.image_column, job.input.video_column) == ("image", "video")
    rows = rows_of(job)
    assert [r.id for r in rows] == ["000.tar:s/001", "000.tar:s/002", "000.tar:s/003", "000.tar:s/004",
                                    "001.tar:t/001"]
    first = rows[0].data
    assert first["image"] == first["jpg"] == png_bytes(1) and first["txt"] == "a red cat" and first["cls"] == 3
    assert first["json"] == {"question": "what?"} and first["question"] == "what?" and first["video"] is None
    assert rows[1].data["image"] == png_bytes(2)
    assert rows[2].data is None and "json member that is not JSON" in rows[2].error
    assert rows[3].data["image"] is None and rows[4].data["video"] == b"not really a video"
    assert count_rows(job.input.files) == 5
    assert {"image", "video", "txt", "json", "question", "cls"} <= columns_of(job.input.files[0])

    cut = tmp_path / "cut" / "000.tar"
    cut.parent.mkdir()
    with tarfile.open(shards / "000.tar") as tar:
        middle = tar.getmember("s/003.jpg").offset_data + 100  # inside the third sample's image
    cut.write_bytes((shards / "000.tar").read_bytes()[:middle])
    rows = rows_of(job_for(tmp_path, cut))
    assert [r.error for r in rows[:2]] == [None, None] and len(rows) == 3
    assert rows[2].id == "000.tar:s/003" and "the rest of 000.tar cannot be read" in rows[2].error
    assert count_rows([cut]) == len(rows)


# ---- Hugging Face datasets (save_to_disk) ---------------------------------------------------------------


def test_a_saved_hugging_face_dataset_reads_its_arrow_files_with_image_structs(tmp_path):
    import datasets  # the test extra installs it; the reader itself does not need it
    picture = tmp_path / "pic.png"
    random_image(32, 24, 5).save(picture)
    features = datasets.Features({"question": datasets.Value("string"), "image": datasets.Image()})
    train = datasets.Dataset.from_dict({"question": ["q0", "q1", "q2"], "image": [str(picture)] * 3},
                                       features=features)
    test = datasets.Dataset.from_dict({"question": ["t0"], "image": [str(picture)]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "ds"), max_shard_size="1MB")
    job = job_for(tmp_path, tmp_path / "ds", prompt_column="question", image_column="image")
    assert job.input.formats == {"hf-dataset"}
    rows = rows_of(job)
    assert [r.id for r in rows] == [f"train/data-00000-of-00001.arrow:{i}" for i in range(3)] + \
        ["test/data-00000-of-00001.arrow:0"]
    assert rows[1].data["question"] == "q1" and rows[1].data["image"]["bytes"] == picture.read_bytes()
    assert count_rows(job.input.files, "hf-dataset") == 4
    assert columns_of(job.input.files[0]) == {"question", "image"}
    one_split = job_for(tmp_path, tmp_path / "ds" / "test", prompt_column="question", format="hf-dataset")
    assert [r.id for r in rows_of(one_split)] == ["data-00000-of-00001.arrow:0"]


# ---- media folders --------------------------------------------------------------------------------------


def test_a_folder_of_media_files_is_a_row_per_file_named_by_its_path(tmp_path):
    media = tmp_path / "media"
    (media / "b").mkdir(parents=True)
    random_image(20, 20, 0).save(media / "z.png")
    random_image(20, 20, 1).save(media / "b" / "a.JPG")
    (media / "b" / "clip.mp4").write_bytes(b"\0")
    (media / "notes.md").write_text("not media")
    job = job_for(tmp_path, media)
    assert job.input.files == [media] and job.input.formats == {"media"}
    assert (job.input.image_column, job.input.video_column) == ("image", "video")
    rows = rows_of(job)
    assert [r.id for r in rows] == ["b/a.JPG", "b/clip.mp4", "z.png"]
    assert rows[0].data == {"image": str(media / "b" / "a.JPG"), "video": None, "path": "b/a.JPG"}
    assert rows[1].data["video"] == str(media / "b" / "clip.mp4") and rows[1].data["image"] is None
    assert count_rows(job.input.files) == 3
    globbed = job_for(tmp_path, media / "**" / "*.png")
    assert [r.id for r in rows_of(globbed)] == ["z.png"]


# ---- what cannot be read --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, setting, words", [
    ("data.xml", {}, "cannot tell how to read data.xml"),
    ("rows.jsonl", {"format": "yaml"}, "input.format: must be one of auto, jsonl"),
    ("rows.jsonl", {"format": "csv"}, "cannot tell how to read rows.jsonl from its name (expected .csv)"),
])
def test_an_input_batchvl_cannot_read_names_the_way_forward(tmp_path, name, setting, words):
    (tmp_path / name).write_text('{"a": 1}\n')
    with pytest.raises(JobError) as e:
        job_for(tmp_path, tmp_path / name, **setting)
    message = str(e.value)
    assert message.startswith("input.") and words in message.replace(str(tmp_path) + "/", "")
    if not setting.get("format") == "yaml":
        assert "input.format names how to read it" in message


@pytest.mark.parametrize("path", ["out/res.jsonl", "results.parquet", "x.csv"])
def test_an_output_path_that_looks_like_a_file_is_one_line_naming_the_key(tmp_path, path):
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n')
    raw = {"model": "m", "prompt": "p", "input": {"path": "rows.jsonl"}, "output": {"path": path}}
    with pytest.raises(JobError, match=r"^output.path: .* looks like a file name, .*batchvl export"):
        job_from_mapping(raw, tmp_path)
