"""engine.separate_process: a single-process run's engine in a spawned process of its own, its tiles through one
shared-memory buffer. It must write what the engine in the run's own process writes, grow the buffer when a
batch needs more, survive nothing silently (its death fails the run, and a rerun writes each row once), and
raise in the run's process the errors the run loop tells apart. CPU engine, tiny checkpoint, float32."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from batchvl.cli import main
from batchvl.errors import JobError, WorkerError
from batchvl.run import engine_process
from batchvl.run.engine_process import EngineProcess, _generate
from tests.conftest import base_job, write_job, write_jsonl


def job_file(tiny_model, images, tmp_path, name: str, separate: bool):
    rows = [{"id": f"r{i}", "prompt": "<image>\nDescribe.", "image": str(images[n])}
            for i, n in enumerate(["tiny.png", "square.jpg", "wide.jpg", "tall.png"])]
    rows.insert(2, {"id": "missing", "prompt": "<image>\nDescribe.", "image": str(tmp_path / "nope.jpg")})
    rows.append({"id": "text", "prompt": "Say hi", "image": None})
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    job = base_job(tiny_model, src, tmp_path / f"out-{name}", generation={"max_new_tokens": 6},
                   engine={"backend": "native", "max_batch_size": 2, "separate_process": separate})
    return write_job(tmp_path / f"{name}.yaml", job), tmp_path / f"out-{name}"


def rows_of(out) -> dict[str, tuple]:
    table = pq.read_table(out).to_pylist()
    assert len({r["id"] for r in table}) == len(table)  # each id once
    return {r["id"]: (r["text"], r["error"], r["output_tokens"]) for r in table}


def test_an_engine_process_writes_what_the_engine_in_the_run_process_writes(tiny_model, images, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(engine_process, "START_BYTES", 1)  # the first batch has the fewest tiles: the buffer grows
    grown = []
    real = EngineProcess._room
    monkeypatch.setattr(EngineProcess, "_room", lambda self, size: grown.append(
        self._buffer is None or self._buffer.numel() < size) or real(self, size))
    separate, out = job_file(tiny_model, images, tmp_path, "separate", True)
    inline, inline_out = job_file(tiny_model, images, tmp_path, "inline", False)
    assert main(["run", str(separate)]) == 0
    assert main(["run", str(inline)]) == 0
    got, want = rows_of(out), rows_of(inline_out)
    assert got == want and len(got) == 6 and got["missing"][1] and got["r0"][1] is None
    assert sum(grown) >= 2  # the first buffer, and at least one larger one


def test_the_engine_process_killed_fails_the_run_and_a_rerun_writes_each_row_once(tiny_model, images, tmp_path,
                                                                                  monkeypatch, capsys):
    job, out = job_file(tiny_model, images, tmp_path, "killed", True)
    monkeypatch.setenv("BATCHVL_FAULT", "kill:engine:2@engine")  # SIGKILL the engine process at its 2nd batch
    assert main(["run", str(job)]) == 1
    assert "the engine process died (killed by signal 9)" in capsys.readouterr().err
    first = rows_of(out) if any(out.glob("*.parquet")) else {}
    assert len(first) < 6
    monkeypatch.delenv("BATCHVL_FAULT")
    assert main(["run", str(job)]) == 0
    assert len(rows_of(out)) == 6


class _Engine:
    def __init__(self, error: BaseException):
        self.error = error

    def generate(self, requests):
        raise self.error


@pytest.mark.parametrize("error,kind", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"), "oom"),
    (JobError("model: refused"), "job"),
    (ValueError("a row's own problem"), "batch"),
])
def test_errors_of_a_batch_in_the_engine_process_are_raised_in_the_run_process_as_the_loop_tells_them_apart(
        error, kind):
    answer = _generate(_Engine(error), None, [], [], False)
    assert answer[0] == kind and str(error) in answer[1]
    proxy = EngineProcess.__new__(EngineProcess)  # only its answer handling, no process
    proxy._conn = type("Conn", (), {"recv": lambda self: answer})()
    raised = {"oom": torch.cuda.OutOfMemoryError, "job": JobError, "batch": RuntimeError}[kind]
    with pytest.raises(raised, match="refused|out of memory|own problem"):
        proxy._answer()
    proxy._conn = type("Conn", (), {"recv": lambda self: ("fatal", "AcceleratorError: illegal address")})()
    with pytest.raises(WorkerError, match="illegal address"):
        proxy._answer()
