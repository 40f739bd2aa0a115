"""Row ids: default ids named relative to what input.path names, and folders whose ids would move."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchvl.cli import main
from batchvl.config.load import job_from_mapping
from batchvl.io.ids import Ids, moved_folder
from batchvl.io.readers import read_rows

from .conftest import base_job, write_job, write_jsonl


def names_for(tmp_path: Path, input_path: str) -> list[str]:
    job = job_from_mapping({"model": "m", "prompt": "p", "input": {"path": input_path}, "output": {"path": "out"}},
                           tmp_path)
    return [row.id for _, row in read_rows(job.input.files, Ids.of(job))]


def test_default_ids_name_files_relative_to_what_input_path_names(tmp_path):
    data = tmp_path / "data"
    (data / "x").mkdir(parents=True)
    write_jsonl(data / "x" / "a.jsonl", [{"p": 1}, {"p": 2}])
    # one file in one subfolder: still named by its path below the folder input.path names
    assert names_for(tmp_path, "data") == ["x/a.jsonl:1", "x/a.jsonl:2"]
    (data / "y").mkdir()
    pq.write_table(pa.table({"p": [3]}), data / "y" / "b.parquet")
    (data / "c.jsonl").write_text('{"p": 4}\n')
    everything = ["c.jsonl:1", "x/a.jsonl:1", "x/a.jsonl:2", "y/b.parquet:0"]
    assert names_for(tmp_path, "data") == everything  # the old ids did not move
    assert names_for(tmp_path, str(data)) == everything  # absolute or relative to the job file alike
    assert names_for(tmp_path, "data/**/*.*") == everything
    assert names_for(tmp_path, "data/*/a.jsonl") == ["x/a.jsonl:1", "x/a.jsonl:2"]  # below `data`, the glob's folder
    assert names_for(tmp_path, "data/x/*.jsonl") == ["a.jsonl:1", "a.jsonl:2"]
    assert names_for(tmp_path, "data/x/a.jsonl") == ["a.jsonl:1", "a.jsonl:2"]  # a file: its name


def test_moved_folder_finds_ids_relative_to_another_folder_and_nothing_else():
    root = Path("/in/data")
    names = ["x/a.jsonl", "y/b.parquet"]
    # written when data held only x/a.jsonl (an older batchvl), or with input.path data/x
    assert moved_folder({"a.jsonl:1", "a.jsonl:2"}, names, root) == ("a.jsonl", "x/a.jsonl", Path("/in/data/x"))
    assert moved_folder({"k#dup@a.jsonl:3"}, names, root) == ("a.jsonl", "x/a.jsonl", Path("/in/data/x"))
    # written with input.path /in, now /in/data
    assert moved_folder({"data/x/a.jsonl:5"}, names, root) == ("data/x/a.jsonl", "x/a.jsonl", Path("/in"))
    # nothing moved: ids of these files, of a file since removed, of the id column, duplicates of them
    fine = {"x/a.jsonl:1", "y/b.parquet:0", "gone.jsonl:1", "z/a.jsonl:1", "k7", "a.jsonl", "a.jsonl:x",
            "k#dup@x/a.jsonl:2"}
    assert moved_folder(fine, names, root) is None
    # an extra folder that is not the end of the root is a removed file, not a move
    assert moved_folder({"other/x/a.jsonl:1"}, names, root) is None


def test_a_file_added_to_the_input_folder_runs_no_row_twice(tiny_model, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "x").mkdir(parents=True)
    write_jsonl(data / "x" / "a.jsonl", [{"prompt": f"row {i}"} for i in range(3)])
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, data, tmp_path / "out",
                                                    generation={"max_new_tokens": 2},
                                                    input={"id_column": None, "image_column": None}))
    assert main(["run", str(job), "--quiet"]) == 0
    (data / "y").mkdir()
    write_jsonl(data / "y" / "b.jsonl", [{"prompt": "new"}])
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 0
    assert "1 rows ok, 0 failed, 3 already done" in capsys.readouterr().out
    ids = [r["id"] for r in pq.read_table(tmp_path / "out").to_pylist()]
    assert sorted(ids) == ["x/a.jsonl:1", "x/a.jsonl:2", "x/a.jsonl:3", "y/b.jsonl:1"]
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "4 rows in" in capsys.readouterr().out


def test_a_folder_whose_ids_would_move_is_refused_with_the_input_path_that_resumes_it(tiny_model, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "x").mkdir(parents=True)
    write_jsonl(data / "x" / "a.jsonl", [{"prompt": f"row {i}"} for i in range(2)])
    # what an older batchvl wrote for input.path `data` while data held x/a.jsonl alone: ids `a.jsonl:N`
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, data / "x", tmp_path / "out",
                                                    generation={"max_new_tokens": 2},
                                                    input={"id_column": None, "image_column": None}))
    assert main(["run", str(job), "--quiet"]) == 0
    fingerprint = (tmp_path / "out" / "_batchvl.json").read_text()
    write_jsonl(data / "y.jsonl", [{"prompt": "new"}])
    capsys.readouterr()
    for command in ("validate", "run"):
        assert main([command, str(job), "--set", f"input.path={data}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "holds ids that name input files relative to" in err and "('a.jsonl' for what is now 'x/a.jsonl')" in err
        assert f"set input.path: {data / 'x'}," in err  # input.path was given absolute, so is the answer
    assert main(["run", str(job), "--set", "input.path=data"]) == 2
    assert "set input.path: data/x," in capsys.readouterr().err  # relative to the job file, as it was given
    assert sorted(r["id"] for r in pq.read_table(tmp_path / "out").to_pylist()) == ["a.jsonl:1", "a.jsonl:2"]
    assert (tmp_path / "out" / "_batchvl.json").read_text() == fingerprint  # nothing was written
    assert main(["run", str(job), "--quiet", "--set", "input.path=data/x"]) == 0
    assert "0 rows ok, 0 failed, 2 already done" in capsys.readouterr().out
