"""Nothing a row contains can stop a job: keep columns typed differently per file, values with no output
equivalent."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchvl.cli import main
from batchvl.core import Result
from batchvl.io.writer import PartWriter, output_schema

from .conftest import base_job, write_job


def by_id(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id appears more than once"
    return {r["id"]: r for r in rows}


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
    writer = PartWriter(tmp_path / "out", schema, rows_per_file=10)
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
