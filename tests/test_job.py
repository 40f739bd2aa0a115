"""The job file: keys, types, overrides, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchvl.cli import main
from batchvl.config import JobError, load_job

from .conftest import base_job, write_job, write_jsonl


@pytest.fixture
def job_file(tiny_model, tmp_path):
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hi", "image": None}])
    return write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out"))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_of(capsys, job_file, *sets) -> str:
    args = ["validate", str(job_file)]
    for s in sets:
        args += ["--set", s]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("override,key,words", [
    ("input.pathh=x.jsonl", "input.pathh", "unknown key"),
    ("bogus=1", "bogus", "unknown key"),
    ("generation.max_new_tokens=lots", "generation.max_new_tokens", "expected an integer"),
    ("generation.max_new_tokens=0", "generation.max_new_tokens", ">= 1"),
    ("generation.temperature=hot", "generation.temperature", "expected a number"),
    ("engine.trust_remote_code=maybe", "engine.trust_remote_code", "true or false"),
    ("engine.backend=vllm", "engine.backend", "must be one of"),
    ("engine.dtype=int8", "engine.dtype", "must be one of"),
    ("input.path=missing.jsonl", "input.path", "no such file"),
    ("input.path=rows.csv", "input.path", "no such file"),
    ("input.path=*.nothing", "input.path", "matches no"),
    ("model=/no/such/dir", "model", "no such checkpoint"),
    ("model=someorg/not-cached-model", "model", "not in the local Hugging Face cache"),
    ("input.prompt_column=question", "input.prompt_column", "'question' is not in rows.jsonl"),
    ("output.keep_columns=[nope]", "output.keep_columns[0]", "'nope' is not in"),
    ("chat_template=missing.jinja", "chat_template", "no such file"),
    ("input=3", "input", "expected a mapping"),
    ("media.max_dynamic_patch=0", "media.max_dynamic_patch", ">= 1"),
    ("media.prepare_processes=-1", "media.prepare_processes", "must be >= 0, got -1"),
    ("media.prepare_processes=two", "media.prepare_processes", "must be auto or a number of processes, got 'two'"),
    ("input.media_root=nowhere", "input.media_root", "no such directory"),
    ("engine.refill_at=0", "engine.refill_at", "must be in (0, 1], got 0"),
    ("engine.refill=sometimes", "engine.refill", "must be auto, true or false, got 'sometimes'"),
    ("engine.refill_at=1.5", "engine.refill_at", "must be in (0, 1], got 1.5"),
])
def test_bad_key_gives_one_line_naming_it(capsys, job_file, override, key, words, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    line = error_of(capsys, job_file, override)
    assert line.startswith(f"batchvl: error: {key}: "), line
    assert words in line, line


def test_missing_required_key(capsys, tmp_path):
    job = write_job(tmp_path / "job.yaml", {"model": "x", "output": {"path": "out"}})
    assert error_of(capsys, job) == "batchvl: error: input: missing (required)"


def test_missing_job_file_and_bad_yaml(capsys, tmp_path):
    assert "no such file" in error_of(capsys, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert error_of(capsys, bad).startswith("batchvl: error: job: not valid YAML")


def test_neither_prompt_nor_prompt_column(capsys, job_file):
    assert "prompt: missing" in error_of(capsys, job_file, "input.prompt_column=null")


def test_no_traceback_from_the_installed_command(job_file):
    proc = subprocess.run([sys.executable, "-m", "batchvl", "run", str(job_file), "--set", "engine.device=tpu"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "batchvl: error: engine.device: must be one of auto, cpu, cuda; got 'tpu'"


def test_set_overrides_keep_yaml_types(job_file):
    job = load_job(job_file, ["generation.max_new_tokens=64", "generation.temperature=0.7",
                              "output.keep_columns=[a, b]", "engine.trust_remote_code=true",
                              "prompt=Describe {name}."])
    assert job.generation.max_new_tokens == 64 and job.generation.temperature == 0.7
    assert job.output.keep_columns == ["a", "b"] and job.engine.trust_remote_code is True
    assert job.prompt == "Describe {name}."


def test_set_without_equals_is_an_error(job_file):
    with pytest.raises(JobError, match="^--set: expected KEY=VALUE"):
        load_job(job_file, ["generation.max_new_tokens"])


def test_relative_paths_resolve_against_the_job_file(tiny_model, tmp_path):
    sub = tmp_path / "jobs"
    sub.mkdir()
    write_jsonl(sub / "rows.jsonl", [{"id": 1, "prompt": "x"}])
    job = load_job(write_job(sub / "job.yaml", base_job(tiny_model, "rows.jsonl", "out")))
    assert job.input.files == [sub / "rows.jsonl"]
    assert job.output_dir == sub / "out"


def test_validate_prints_the_plan_and_changes_nothing(capsys, job_file, tmp_path):
    code, out, _ = run_cli(capsys, "validate", str(job_file))
    assert code == 0
    assert "1 row(s)" in out and "transformers" in out and "tiny-internvl" in out and "ok:" in out
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_reported(capsys, job_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "output.path" in error_of(capsys, job_file, f"output.path={blocker}")
