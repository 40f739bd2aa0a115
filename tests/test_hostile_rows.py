"""Rows that try to stop the job: rows the engine fails on."""

from __future__ import annotations

import pytest
import torch

from batchvl.cli import main
from batchvl.core import Request
from batchvl.errors import JobError, OutputWriteError
from batchvl.run.loop import run_batch

from .test_robustness import by_id, text_job


class Failing:
    """The real engine, except that a batch holding row `bad` raises `error`."""

    def __init__(self, engine, bad: str, error: BaseException):
        self.engine, self.bad, self.error, self.sizes = engine, bad, error, []

    def generate(self, requests):
        self.sizes.append(len(requests))
        if any(r.id == self.bad for r in requests):
            raise self.error
        return self.engine.generate(requests)

    def close(self):
        self.engine.close()


def test_an_engine_error_costs_only_the_row_that_causes_it(tiny_model, tmp_path, monkeypatch):
    import batchvl.run.loop as loop

    real, engines = loop.make_engine, []

    def make_engine(*a, **k):
        engines.append(Failing(real(*a, **k), "r3", RuntimeError("index 7 is out of bounds")))
        return engines[-1]

    monkeypatch.setattr(loop, "make_engine", make_engine)
    rows = [{"id": f"r{i}", "prompt": f"row {i}"} for i in range(6)]
    job = text_job(tmp_path, tiny_model, rows, generation={"max_new_tokens": 4}, engine={"max_batch_size": 4})
    assert main(["run", str(job), "--quiet"]) == 0
    assert engines[0].sizes == [4, 2, 2, 1, 1, 2]  # halves down to r3 alone; the next batch runs whole
    out = by_id(tmp_path / "out")
    assert out["r3"]["error"] == "internal: RuntimeError: index 7 is out of bounds"
    assert out["r3"]["finish_reason"] == "error"
    assert all(out[f"r{i}"]["error"] is None and out[f"r{i}"]["text"] for i in (0, 1, 2, 4, 5))


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(1), JobError("model: gone"),
                                   OutputWriteError("disk full"), torch.AcceleratorError("CUDA error")])
def test_errors_that_are_no_rows_doing_still_stop_the_job(error):
    engine = Failing(None, "a", error)
    batch = [Request(id=i, prompt_ids=[1, 2], tiles=None, tiles_per_image=[]) for i in ("a", "b")]
    with pytest.raises(type(error)):
        run_batch(engine, batch)
    assert engine.sizes == [2]  # not retried
