"""Streaming readers, the part writer, resume and --overwrite."""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from batchvl.cli import main
from batchvl.core import Result
from batchvl.io.durable import Owner
from batchvl.io.ids import Ids
from batchvl.io.readers import count_rows, read_rows
from batchvl.io.writer import BASE_SCHEMA, PartWriter, done_ids, output_schema

from .conftest import base_job, write_job, write_jsonl


def test_jsonl_bad_lines_become_error_rows_keyed_by_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n\nnot json\n[1, 2]\n{"prompt": "b"}\n')
    rows = [r for _, r in read_rows([path], Ids(path.parent))]
    assert [r.id for r in rows] == ["rows.jsonl:1", "rows.jsonl:3", "rows.jsonl:4", "rows.jsonl:5"]
    assert rows[0].data == {"prompt": "a"} and rows[0].error is None
    assert rows[1].data is None and "not valid JSON" in rows[1].error
    assert rows[2].data is None and "not an object" in rows[2].error
    assert count_rows([path]) == 4


def test_missing_id_becomes_an_error_row(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"id": 7, "p": 1}, {"p": 2}])
    rows = [r for _, r in read_rows([path], Ids(path.parent, "id"))]
    assert rows[0].id == "7" and rows[0].error is None
    assert rows[1].id == "rows.jsonl:2" and "no value in id column" in rows[1].error


def test_parquet_is_read_in_batches_with_row_numbers(tmp_path, monkeypatch):
    import batchvl.io.readers as readers

    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 7)
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(30)]}), tmp_path / "a.parquet", row_group_size=10)
    rows = [r for _, r in read_rows([tmp_path / "a.parquet"], Ids(tmp_path))]
    assert [r.id for r in rows] == [f"a.parquet:{i}" for i in range(30)]
    assert rows[29].data == {"prompt": "p29"}


def test_million_row_jsonl_streams_in_bounded_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(200_000):
            f.write(json.dumps({"id": i, "prompt": "describe this image please", "image": f"img/{i}.jpg"}) + "\n")
    tracemalloc.start()
    n = sum(1 for _ in read_rows([path], Ids(path.parent, "id")))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 200_000
    assert peak < 5 * 1024 * 1024, peak  # the file is ~14 MB; whole-file reading would far exceed this


def test_writer_commits_parts_atomically_and_reads_as_one_dataset(tmp_path):
    schema = output_schema({"source": pa.string()})
    writer = PartWriter(tmp_path / "out", schema, rows_per_file=2, owner=Owner.new())
    for i in range(5):
        writer.add(Result(f"r{i}", f"text {i}", None, "stop", 10 + i, 3, {"source": "s"}))
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 2  # 4 rows committed, 1 buffered
    writer.close()
    assert not list((tmp_path / "out").glob(".tmp-*"))
    table = ds.dataset(tmp_path / "out", format="parquet").to_table()
    assert table.schema.names == [*BASE_SCHEMA.names, "source"]
    assert sorted(table.column("id").to_pylist()) == [f"r{i}" for i in range(5)]
    assert len(pd.read_parquet(tmp_path / "out")) == 5
    assert duckdb.sql(f"select count(*) from '{tmp_path / 'out'}/*.parquet'").fetchall() == [(5,)]
    assert done_ids(tmp_path / "out") == {f"r{i}" for i in range(5)}


def test_rerun_skips_done_ids_and_overwrite_starts_over(tiny_model, tmp_path, capsys):
    rows = [{"id": f"r{i}", "prompt": f"row {i}"} for i in range(5)]
    inp = write_jsonl(tmp_path / "rows.jsonl", rows[:3])
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out", input={"image_column": None}))
    assert main(["run", str(job), "--quiet"]) == 0
    first = pq.read_table(tmp_path / "out").to_pylist()
    assert "3 rows ok" in capsys.readouterr().out

    write_jsonl(inp, rows)  # two more rows appear
    assert main(["run", str(job), "--quiet"]) == 0
    assert "2 rows ok, 0 failed, 3 already done" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["id"] for r in table) == [f"r{i}" for i in range(5)]  # each id exactly once
    assert {r["id"]: r["text"] for r in first}.items() <= {r["id"]: r["text"] for r in table}.items()

    assert main(["run", str(job), "--quiet", "--overwrite"]) == 0
    assert "5 rows ok, 0 failed, 0 already done" in capsys.readouterr().out
    assert sorted(r["id"] for r in pq.read_table(tmp_path / "out").to_pylist()) == [f"r{i}" for i in range(5)]


def test_every_input_row_gets_an_output_row(tiny_model, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "ok", "prompt": "hi"}\nbroken\n{"id": "noimg", "prompt": "x", "image": "gone.jpg"}\n'
                    '{"id": "badtype", "prompt": 5}\n{"id": "noprompt"}\n')
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, path, tmp_path / "out"))
    assert main(["run", str(job), "--quiet"]) == 0
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert set(out) == {"ok", "rows.jsonl:2", "noimg", "badtype", "noprompt"}
    assert out["ok"]["error"] is None and out["ok"]["finish_reason"] in ("stop", "length")
    for key, words in [("rows.jsonl:2", "not valid JSON"), ("noimg", "no such file"),
                       ("badtype", "must be a string"), ("noprompt", "no prompt")]:
        assert words in out[key]["error"] and out[key]["finish_reason"] == "error", key
        assert out[key]["text"] is None and out[key]["output_tokens"] == 0


def test_directory_and_glob_inputs(tiny_model, tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"prompt": "one"}])
    pq.write_table(pa.table({"prompt": ["two", "three"]}), tmp_path / "data" / "b.parquet")
    for path, out in ((tmp_path / "data", "out1"), (tmp_path / "data" / "*.*", "out2")):
        job = base_job(tiny_model, path, tmp_path / out, input={"id_column": None, "image_column": None})
        write_job(tmp_path / "job.yaml", job)
        assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
        ids = sorted(r["id"] for r in pq.read_table(tmp_path / out).to_pylist())
        assert ids == ["a.jsonl:1", "b.parquet:0", "b.parquet:1"]


def test_prompt_fields_are_filled_from_the_row(tiny_model, tmp_path):
    from .reference import reference_generate

    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "x", "name": "a cat"}, {"id": "y"}])
    job = base_job(tiny_model, inp, tmp_path / "out", prompt="Describe {name} in JSON like {\"a\": 1}.",
                   input={"prompt_column": None, "image_column": None})
    write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    text, prompt_tokens, _ = reference_generate(tiny_model, 'Describe a cat in JSON like {"a": 1}.', [], 12)
    assert out["x"]["text"] == text and out["x"]["prompt_tokens"] == prompt_tokens
    assert "no column 'name'" in out["y"]["error"]
