"""How a run ends: exit code 3 when too many of the folder's rows failed, the failed rows by error kind with an
example id (at the end of a run and in `batchvl status`), rates after the model's load, progress lines on a
stderr that is no terminal, `--version`, and image structs whose errors name their field."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchvl.cli import EXIT_ROWS_FAILED, main
from batchvl.core import Result
from batchvl.errors import RowError
from batchvl.prepare.preparer import RowPreparer
from batchvl.run import progress
from batchvl.run.progress import Progress
from batchvl.run.summary import FolderRows, Summary

from .conftest import base_job, write_job, write_jsonl


@pytest.mark.parametrize("ok,failed,fraction,too_many", [
    (0, 0, 0.1, False),  # nothing ran
    (9, 1, 0.1, False),  # exactly the share allowed
    (8, 2, 0.1, True),
    (0, 3, 1.0, True),  # every row failed: always
    (1, 3, 1.0, False),
    (100, 1, 0.0, True),  # 0: any failed row
])
def test_too_many_failed_rows(ok, failed, fraction, too_many):
    rows = FolderRows(ok, {"media": failed} if failed else {})
    assert (rows.too_many_failed(fraction) is not None) == too_many


def test_errors_are_listed_by_kind_most_frequent_first_with_an_example_id():
    rows = FolderRows(5, {"input": 1, "media": 3}, {"media": "a7", "input": "x.jsonl:3"})
    assert rows.error_lines() == ["  media: 3 row(s) (e.g. id 'a7')", "  input: 1 row(s) (e.g. id 'x.jsonl:3')"]


def test_the_summary_rates_count_from_the_models_load():
    line = Summary(ok=20, elapsed_s=12.0, load_s=10.0, output_tokens=100).line("out")
    assert "12.0 s (10.0 s loading the model); 10.00 rows/s, " in line and "50.0 output tokens/s" in line


def test_on_a_non_terminal_stderr_the_bar_is_periodic_log_lines(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="batchvl.run.progress")
    bar = Progress(total=4)  # pytest's stderr is no terminal
    assert bar.bar.disable
    for i in range(2):
        bar.update(Result(str(i), "t", None, "stop", 3, 5, images=1))
    bar.update(Result.failed("x", "media: gone"))
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and lines[-1].startswith("progress: 3/4 rows (75.0%), ") and "errors=1" in lines[-1]
    assert not any("\r" in line for line in lines)


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("batchvl 0.")


@pytest.mark.parametrize("cell,words", [
    ({"bytes": 3, "path": None}, "media: image.bytes: expected raw bytes or null in the image struct, got int"),
    ({"bytes": None, "path": ["a.jpg"]}, "media: image.path: expected a string or null in the image struct, got list"),
    (["a.jpg", {"bytes": None}], "media: image[1]: the image struct has neither bytes nor path (keys: bytes)"),
    (["a.jpg", {"bytes": "iVBOR"}], "media: image[1].bytes: expected raw bytes or null in the image struct, got str"),
])
def test_a_malformed_image_struct_names_its_column_and_field(cell, words):
    with pytest.raises(RowError) as caught:
        RowPreparer._refs({"image": cell}, "image")
    assert str(caught.value) == words


def test_a_run_whose_rows_fail_too_often_exits_3_and_lists_the_errors(tiny_model, images, tmp_path, capsys):
    rows = [{"id": "a", "prompt": "hi", "image": str(images["tiny.png"])},
            {"id": "b", "prompt": "hi", "image": "missing.png"},
            {"id": "c", "prompt": "hi", "image": None}]
    inp = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, out, generation={"max_new_tokens": 2},
                                                    run={"max_error_fraction": 0.1}))
    assert main(["run", str(job), "-q"]) == EXIT_ROWS_FAILED  # 1 of 3 is more than the default 0.1
    captured = capsys.readouterr()
    assert "  media: 1 row(s) (e.g. id 'b')" in captured.out
    assert "1 of the output folder's 3 rows failed (33.3%, more than run.max_error_fraction 0.1)" in captured.err
    # the verdict is the folder's: a rerun with nothing to do judges the same rows (here, with a higher bound)
    assert main(["run", str(job), "-q"]) == EXIT_ROWS_FAILED
    assert main(["run", str(job), "-q", "--set", "run.max_error_fraction=0.5"]) == 0
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[:2] == [f"{out}: 3 rows in 1 part file(s), 1 failed:", "  media: 1 row(s) (e.g. id 'b')"]


def test_the_quickstart_demo_job_runs_and_exits_0(tiny_model, tmp_path):
    """The README's first Quickstart command ends with `batchvl run jobs/demo.yaml`; its one bad row (a missing
    file, on purpose) must not make the run exit non-zero."""
    demo = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"
    assert main(["run", str(demo), "--quiet", "--set", f"model={tiny_model}",
                 "--set", f"output.path={tmp_path / 'out'}"]) == 0
    done = pq.read_table(tmp_path / "out").to_pylist()
    assert len(done) == 6 and [r["id"] for r in done if r["error"]] == ["missing-file"]
