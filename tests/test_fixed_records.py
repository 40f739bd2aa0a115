"""A record that could not be read becomes an error row whose id is its position (`rows.jsonl:2`). Fix the record
and rerun the same command: the error row is replaced by the record's row, never kept beside it. Other failures
stay until --retry-errors."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from batchvl.cli import EXIT_ROWS_FAILED, main
from batchvl.io.shards import Shard

from .conftest import base_job, write_job

GOOD = ['{"id": "a", "prompt": "one"}', '{"id": "c", "prompt": "three"}']
BAD, FIXED = '{"id": "b", "prompt": "two"', '{"id": "b", "prompt": "two"}'


def rows(out) -> dict[str, str | None]:
    table = pq.read_table(out).to_pylist()
    assert len({r["id"] for r in table}) == len(table), "an id appears twice"
    return {r["id"]: r["error"] for r in table}


@pytest.mark.parametrize("id_column", ["id", None])
def test_a_fixed_line_replaces_its_error_row(tiny_model, tmp_path, capsys, id_column):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([GOOD[0], BAD, GOOD[1]]) + "\n")
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, path, tmp_path / "out",
                                                     generation={"max_new_tokens": 3},
                                                     input={"image_column": None, "id_column": id_column}))
    assert main(["run", str(job), "--quiet"]) == 0
    first = rows(tmp_path / "out")
    assert first["rows.jsonl:2"].startswith("input: line rows.jsonl:2 is not valid JSON")
    assert main(["run", str(job), "--quiet"]) == 0  # unchanged input: nothing to do
    assert rows(tmp_path / "out") == first

    path.write_text("\n".join([GOOD[0], FIXED, GOOD[1]]) + "\n")
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 0
    assert "1 rows ok, 0 failed, 2 already done" in capsys.readouterr().out
    ids = ["a", "b", "c"] if id_column else ["rows.jsonl:1", "rows.jsonl:2", "rows.jsonl:3"]
    assert rows(tmp_path / "out") == dict.fromkeys(ids)


def test_a_shard_replaces_the_fixed_records_it_owns(tiny_model, tmp_path):
    lines = [f'{{"id": "r{i}", "prompt": "row {i}"}}' for i in range(10)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines[:1] + [line[:-1] for line in lines[1:]]) + "\n")  # all but the first broken
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, path, tmp_path / "out",
                                                     generation={"max_new_tokens": 2}, input={"image_column": None}))
    for shard in ("0/2", "1/2"):  # the folder holds only broken rows until r0's shard has run: exit code 3
        assert main(["run", str(job), "--quiet", "--shard", shard]) in (0, EXIT_ROWS_FAILED)
    broken = {f"rows.jsonl:{i + 1}" for i in range(1, 10)}
    assert {k for k, e in rows(tmp_path / "out").items() if e is not None} == broken
    path.write_text("\n".join(lines) + "\n")
    assert main(["run", str(job), "--quiet", "--shard", "0/2"]) == 0
    mine = {i for i in broken if Shard(0, 2).owns(i)}
    assert mine and mine != broken
    assert {k for k, e in rows(tmp_path / "out").items() if e is not None} == broken - mine
    assert main(["run", str(job), "--quiet", "--shard", "1/2"]) == 0
    assert rows(tmp_path / "out") == dict.fromkeys(f"r{i}" for i in range(10))
