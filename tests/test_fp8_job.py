"""engine.quantization and engine.quantize_vision as job settings: what is refused, with one line naming the
setting and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchvl.cli import main

from .conftest import base_job, write_job, write_jsonl

NATIVE = ("engine.backend=native",)


def job_dict(model: Path, tmp_path: Path) -> dict:
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hi", "image": None}])
    return base_job(model, rows, tmp_path / "out", chat_template="none")


def one_line_error(capsys, command: str, job: Path, *sets: str) -> str:
    """What `batchvl <command> job --set ...` prints: exit code 2, one line, no traceback."""
    code = main([command, str(job), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err.strip().removeprefix("batchvl: error: ")


CASES = {
    "a bad value": (("engine.quantization=int8",),
                    "engine.quantization: must be one of none, fp8; got 'int8'"),
    "the transformers backend": (("engine.quantization=fp8",),
                                 "engine.quantization: fp8 runs on the native backend only; engine.backend is "
                                 "transformers"),
    "vision without fp8": ((*NATIVE, "engine.quantize_vision=true"),
                           "engine.quantize_vision: quantizes the vision tower with engine.quantization: fp8; "
                           "engine.quantization is none"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_one_line_naming_the_setting(capsys, tiny_model, tmp_path, command, case):
    sets, message = CASES[case]
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, tmp_path))
    assert one_line_error(capsys, command, job, *sets) == message
    assert not (tmp_path / "out").exists()

