"""Every problem of a job file is reported, one line each (exit code 2, no traceback); `validate` checks the
prompt's `{column}` fields against the input's columns."""

from __future__ import annotations

import pytest

from batchvl.cli import main
from batchvl.config import JobError, load_job
from batchvl.errors import JobErrors

from .conftest import base_job, write_job, write_jsonl


@pytest.fixture
def job_file(tiny_model, tmp_path):
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hi", "image": None, "file": "f.jpg"}])
    return write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out"))


def errors_of(capsys, job_file, *sets) -> list[str]:
    args = ["validate", str(job_file)]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()]


def test_every_problem_of_a_job_file_gets_its_own_line(capsys, job_file):
    lines = errors_of(capsys, job_file, "generation.max_new_tokens=lots", "engine.dtype=int8", "bogus=1",
                      "media.prefetch=0")
    # the file is built first: its keys' and types' problems; then (once it builds) the values' ranges
    assert lines == ["batchvl: error: bogus: unknown key (known keys here: chat_template, engine, generation, input, "
                     "media, model, output, prompt, run)",
                     "batchvl: error: generation.max_new_tokens: expected an integer, got a string 'lots'"]
    lines = errors_of(capsys, job_file, "engine.dtype=int8", "media.prefetch=0", "generation.top_p=2",
                      "media.http_retries=11")
    assert [line.split(":")[2].strip() for line in lines] == [
        "engine.dtype", "generation.top_p", "media.prefetch", "media.http_retries"]


def test_one_problem_is_one_plain_job_error(job_file):
    with pytest.raises(JobError) as caught:
        load_job(job_file, ["engine.dtype=int8"])
    assert not isinstance(caught.value, JobErrors) and "\n" not in str(caught.value)


def test_columns_and_model_problems_are_reported_together(capsys, job_file):
    lines = errors_of(capsys, job_file, "model=/no/such/dir", "input.prompt_column=question",
                      "output.keep_columns=[nope]")
    assert [line.split(":")[2].strip() for line in lines] == ["model", "input.prompt_column",
                                                              "output.keep_columns[0]"]


def test_validate_refuses_a_prompt_field_that_names_no_column(capsys, job_file):
    lines = errors_of(capsys, job_file, "input.prompt_column=null", "prompt=Caption {nosuch} of {file}")
    assert lines == ["batchvl: error: prompt: the field {nosuch} names no column of rows.jsonl (columns: file, id, "
                     "image, prompt)"]
    assert main(["validate", str(job_file), "--set", "prompt=Caption #1 of {file}: {id}"]) == 0
