"""An output folder inside the input is refused up front: the next run would read its part files back as input
(a rerun grew the output 2 -> 4 -> 6 rows)."""

from __future__ import annotations

import pytest

from batchvl.cli import main

from .conftest import base_job, write_job, write_jsonl


@pytest.mark.parametrize("input_path, out", [("data", "data/out"), ("data", "data"), ("data/*.jsonl", "data"),
                                             ("data/**/*.parquet", "data/out")])
def test_an_output_folder_inside_the_input_is_refused(tiny_model, tmp_path, capsys, input_path, out):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "rows.jsonl", [{"id": "a", "prompt": "hi"}])
    if input_path.endswith(".parquet"):  # a glob that matched only the parts of an earlier run
        (data / "out").mkdir()
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": ["a"], "prompt": ["hi"]}), data / "out" / "part-x.parquet")
    job = base_job(tiny_model, tmp_path / input_path, tmp_path / out, input={"image_column": None})
    assert main(["validate", str(write_job(tmp_path / "job.yaml", job))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("batchvl: error: output.path: ") and "inside the input" in err


def test_an_output_folder_beside_the_input_is_fine(tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "rows.jsonl", [{"id": "a", "prompt": "hi"}])
    job = base_job(tiny_model, data, tmp_path / "data-out", input={"image_column": None})
    assert main(["validate", str(write_job(tmp_path / "job.yaml", job))]) == 0
