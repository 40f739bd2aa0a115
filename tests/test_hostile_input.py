"""Nothing a row contains can stop a job: JSONL lines Python cannot hold, a line too long to read, a corrupt
Parquet row group, values with no Python (or no output) equivalent, keep columns typed differently per file."""

from __future__ import annotations

import json
import logging
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batchvl.io.readers as readers
from batchvl.cli import main
from batchvl.core import Result
from batchvl.io.durable import Owner
from batchvl.io.ids import Ids
from batchvl.io.readers import columns_of, count_rows, read_rows
from batchvl.io.writer import PartWriter, output_schema

from .conftest import base_job, write_job

HUGE_INT = "7" * 5000  # past Python's 4,300-digit limit on int parsing (ValueError)
DEEP = "[" * 100_000 + "]" * 100_000  # past the recursion limit (RecursionError)


def by_id(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id appears more than once"
    return {r["id"]: r for r in rows}


def hostile_jsonl(path: Path) -> Path:
    lines = [
        '{"id": "a", "prompt": "one", "meta": "m"}',
        '{"id": "huge", "prompt": "x", "n": ' + HUGE_INT + "}",
        '{"id": "deep", "prompt": "x", "n": ' + DEEP + "}",
        "",
        '{"id": "b", "prompt": "two", "meta": {"k": [1, 2]}}',
        '{"id": "long", "prompt": "x", "pad": "' + "x" * 300_000 + '"}',
        '{"id": "lone\\ud800", "prompt": "three", "meta": "half a pair: \\udc00"}',
        '{"id": "c", "prompt": "four"}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_lines_python_cannot_hold_become_error_rows_and_the_rest_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_JSONL_LINE_BYTES", 250_000)
    path = hostile_jsonl(tmp_path / "rows.jsonl")
    rows = [r for _, r in read_rows([path], Ids(path.parent, "id"))]
    assert [r.id for r in rows] == ["a", "rows.jsonl:2", "rows.jsonl:3", "b", "rows.jsonl:6", "lone\\ud800", "c"]
    assert [r.source for r in rows][1:3] == ["rows.jsonl:2", "rows.jsonl:3"]
    assert "cannot be read: Exceeds the limit (4300 digits)" in rows[1].error
    assert "cannot be read: maximum recursion depth exceeded" in rows[2].error
    assert rows[4].error == "input: line rows.jsonl:6 is longer than 250000 bytes (MAX_JSONL_LINE_BYTES); skipped"
    assert all(rows[i].data is None and rows[i].error.startswith("input: line ") for i in (1, 2, 4))
    assert all(rows[i].error is None and rows[i].data["prompt"] for i in (0, 3, 5, 6))
    assert rows[5].id.encode("utf-8") == b"lone\\ud800"  # an id that can be written and found again
    assert count_rows([path]) == len(rows)
    assert columns_of(path) == {"id", "prompt", "meta"}


def test_over_long_jsonl_line_is_skipped_in_bounded_memory(tmp_path, monkeypatch):
    cap = 1024 * 1024
    monkeypatch.setattr(readers, "MAX_JSONL_LINE_BYTES", cap)
    path = tmp_path / "rows.jsonl"
    fits = '{"pad": "' + "y" * (cap - 11) + '"}'  # exactly the cap, newline not counted
    with open(path, "w") as f:
        f.write('{"prompt": "before"}\n')
        f.write('{"pad": "' + "x" * (40 * cap) + '"}\n')  # a 40 MiB line
        f.write(fits + "\n")
        f.write(fits + " \n")  # one byte over
        f.write('{"prompt": "after"}\n')
        f.write('{"pad": "' + "z" * (3 * cap))  # over-long and last, with no newline
    assert len(fits) == cap
    tracemalloc.start()
    rows = [r for _, r in read_rows([path], Ids(path.parent))]
    counted = count_rows([path])
    columns_of(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # a few copies of a line at the cap (read, joined, decoded), whatever the length of the lines skipped:
    # reading the 40 MiB line whole would take at least 40 times the cap
    assert peak < 6 * cap, peak
    assert [r.id for r in rows] == [f"rows.jsonl:{i}" for i in range(1, 7)] and counted == 6
    assert [r.error is None for r in rows] == [True, False, True, False, True, False]
    assert all("longer than 1048576 bytes" in rows[i].error for i in (1, 3, 5))
    assert rows[4].data == {"prompt": "after"}


def test_job_over_hostile_jsonl_exits_0_with_every_row_once(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(readers, "MAX_JSONL_LINE_BYTES", 250_000)
    path = hostile_jsonl(tmp_path / "rows.jsonl")
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, path, tmp_path / "out", input={"image_column": None},
                                                    output={"keep_columns": ["meta"]},
                                                    generation={"max_new_tokens": 2}))
    assert main(["validate", str(job)]) == 0
    assert main(["run", str(job), "--quiet"]) == 0
    out = by_id(tmp_path / "out")
    assert sorted(out) == sorted(["a", "b", "c", "lone\\ud800", "rows.jsonl:2", "rows.jsonl:3", "rows.jsonl:6"])
    for key in ("a", "b", "c", "lone\\ud800"):
        assert out[key]["error"] is None and out[key]["text"] is not None, key
    for key in ("rows.jsonl:2", "rows.jsonl:3", "rows.jsonl:6"):
        assert out[key]["error"].startswith("input: line ") and out[key]["finish_reason"] == "error", key
    assert out["b"]["meta"] == '{"k": [1, 2]}'
    assert out["lone\\ud800"]["meta"] == "half a pair: \\udc00"  # escaped, where it cannot be UTF-8
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows_ok"] == 4 and summary["failed_by_kind"] == {"input": 3}
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 0  # resume finds every id again, the escaped one too
    assert "0 rows ok, 0 failed, 7 already done" in capsys.readouterr().out


def corrupt_row_group(path: Path, group: int, column: str) -> None:
    """Overwrite the first page header of one column chunk of one row group (not the footer)."""
    meta = pq.ParquetFile(path).metadata
    chunk = meta.row_group(group).column(meta.schema.names.index(column))
    offset = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def parquet_rows(path: Path, n: int, group_rows: int) -> Path:
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "prompt": [f"row {i}" for i in range(n)]}),
                   path, row_group_size=group_rows)
    return path


@pytest.mark.parametrize("column", ["prompt", "id"])
def test_corrupt_parquet_row_group_becomes_error_rows_and_the_rest_is_read(tmp_path, column):
    path = parquet_rows(tmp_path / "a.parquet", 5000, 1000)
    corrupt_row_group(path, 2, column)
    with pytest.raises(OSError):
        pq.read_table(path)  # the file really is broken there
    rows = [r for _, r in read_rows([path], Ids(path.parent, "id"))]
    assert len(rows) == 5000 and [r.source for r in rows] == [f"a.parquet:{i}" for i in range(5000)]
    good = [r for r in rows if r.error is None]
    assert [r.id for r in good] == [f"r{i}" for i in (*range(2000), *range(3000, 5000))]
    assert all(r.data == {"id": r.id, "prompt": f"row {r.id[1:]}"} for r in good)
    bad = rows[2000:3000]
    assert all(r.data is None and r.error.startswith("input: row group 2 of a.parquet (rows 2000-2999) cannot be "
                                                     "read: ") for r in bad)
    # their ids: the real ones while the id column alone still reads, else the positional `file:row`
    expected = [f"r{i}" if column == "prompt" else f"a.parquet:{i}" for i in range(2000, 3000)]
    assert [r.id for r in bad] == expected
    assert count_rows([path]) == 5000 and columns_of(path) == {"id", "prompt"}


def test_job_over_corrupt_parquet_exits_0_with_every_row_once(tiny_model, tmp_path, capsys):
    path = parquet_rows(tmp_path / "a.parquet", 30, 10)
    corrupt_row_group(path, 1, "prompt")
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, path, tmp_path / "out", input={"image_column": None},
                                                    generation={"max_new_tokens": 2}))
    assert main(["validate", str(job)]) == 0
    assert "30 row(s)" in capsys.readouterr().out
    assert main(["run", str(job), "--quiet"]) == 0
    out = by_id(tmp_path / "out")
    assert sorted(out) == sorted(f"r{i}" for i in range(30))
    assert [k for k, r in out.items() if r["error"] is None] == [f"r{i}" for i in (*range(10), *range(20, 30))]
    assert all(out[f"r{i}"]["error"].startswith("input: row group 1 of a.parquet") for i in range(10, 20))
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 0
    assert "0 rows ok, 0 failed, 30 already done" in capsys.readouterr().out


def test_parquet_value_with_no_python_equivalent_costs_only_its_row(tmp_path):
    when = pa.array([0, 2**62, 0], pa.timestamp("ms"))  # the middle one is far past year 9999
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "when": when}), tmp_path / "t.parquet")
    rows = [r for _, r in read_rows([tmp_path / "t.parquet"], Ids(tmp_path, "id"))]
    assert [r.id for r in rows] == ["a", "b", "c"]
    assert rows[0].error is None and rows[2].data["prompt"] == "z"
    assert rows[1].data is None and rows[1].error.startswith("input: record t.parquet:1 cannot be read: column 'when'")


def test_keep_columns_typed_differently_per_file_keep_every_row(tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a0", "a1"], "prompt": ["x", "y"], "meta": pa.nulls(2), "n": [1, 2],
                             "w": pa.array([3, 4], pa.int32())}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"id": ["b0", "b1"], "prompt": ["x", "y"], "meta": ["s", None], "n": ["five", None],
                             "w": pa.array([2**40, 5], pa.int64())}), tmp_path / "in" / "b.parquet")
    job = write_job(tmp_path / "job.yaml", base_job(
        tiny_model, tmp_path / "in", tmp_path / "out", input={"image_column": None},
        output={"keep_columns": ["meta", "n", "w"]}, generation={"max_new_tokens": 2}))
    assert main(["run", str(job), "--quiet"]) == 0
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("meta").type == pa.string()  # null with string: string
    assert table.schema.field("w").type == pa.int64()  # int32 with int64: int64
    assert table.schema.field("n").type == pa.string()  # int64 with string: none in common, so JSON text
    out = by_id(tmp_path / "out")
    assert {k: (r["meta"], r["n"], r["w"]) for k, r in out.items()} == {
        "a0": (None, "1", 3), "a1": (None, "2", 4), "b0": ("s", "five", 2**40), "b1": (None, None, 5)}
    assert all(r["error"] is None for r in out.values())


def test_a_value_that_does_not_fit_its_column_is_converted_not_lost(tmp_path, caplog):
    schema = output_schema({"n": pa.int64(), "s": pa.string()})
    writer = PartWriter(tmp_path / "out", schema, rows_per_file=10, owner=Owner.new())
    writer.add(Result("ok", "fine", None, "stop", 3, 1, {"n": 1, "s": "plain"}))
    writer.add(Result("big", "t", None, "stop", 3, 1, {"n": 2**70, "s": {"k": [1]}}))
    writer.add(Result("bad\ud800", "half \udc00", "input: x \ud800", "error", 0, 0, {"n": "7", "s": "\udc00"}))
    with caplog.at_level(logging.WARNING, "batchvl.io.writer"):
        writer.close()
    assert writer.rows_written == 3
    out = by_id(tmp_path / "out")
    assert sorted(out) == ["bad\\ud800", "big", "ok"]
    assert (out["ok"]["n"], out["ok"]["s"]) == (1, "plain")
    assert (out["big"]["n"], out["big"]["s"]) == (None, '{"k": [1]}')  # too big for int64: null, with a warning
    bad = out["bad\\ud800"]
    assert (bad["text"], bad["error"], bad["n"], bad["s"]) == ("half \\udc00", "input: x \\ud800", None, "\\udc00")
    warned = [r.getMessage() for r in caplog.records]
    assert any("row big: its 'n' value does not fit the column's type int64" in m for m in warned), warned
    assert any("row bad\\ud800: its 'n' value" in m for m in warned), warned
