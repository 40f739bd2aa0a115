"""engine.gpus: which devices a run uses, validated when the job file is read."""

from __future__ import annotations

import pytest
import torch

from batchvl.cli import main
from batchvl.job import JobError, load_job

from .conftest import base_job, write_job, write_jsonl


def gpus_job(tmp_path, tiny_model, out, gpus):
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hi"}])
    job = base_job(tiny_model, inp, tmp_path / out, input={"image_column": None}, engine={"gpus": gpus})
    return write_job(tmp_path / f"job-{out}.yaml", job)


@pytest.mark.parametrize("value,words", [
    ("0", "engine.gpus: must be >= 1"),
    ("-2", "engine.gpus: must be >= 1"),
    ("all", "engine.gpus: must be auto, a number of GPUs or a list of GPU ids; got 'all'"),
    ("[0,0]", "engine.gpus: GPU ids must be distinct"),
    ("[1,-1]", "engine.gpus[1]: must be >= 0"),
    ("[]", "engine.gpus: the list of GPU ids is empty"),
    ("[a]", "engine.gpus[0]: expected an integer"),
    ("true", "engine.gpus: expected a string or an integer or a list"),
    ("2", "engine.gpus: 2 asked for, but no CUDA device is visible"),
])
def test_bad_gpus_is_a_one_line_error(value, words, tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    job = gpus_job(tmp_path, tiny_model, "out", "auto")
    assert main(["validate", str(job), "--set", "engine.device=auto", "--set", f"engine.gpus={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"batchvl: error: {words}"), err


def test_gpus_resolves_against_the_visible_devices(tiny_model, tmp_path, monkeypatch):
    job = gpus_job(tmp_path, tiny_model, "out", "auto")

    def load(device="auto", gpus="auto"):
        return load_job(job, [f"engine.device={device}", f"engine.gpus={gpus}"]).engine.devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert load() == [0, 1, 2, 3]
    assert load(gpus=2) == [0, 1] and load(gpus="[3,1]") == [3, 1] and load(gpus="[2]") == [2]
    assert load(device="cpu") == [0]  # auto on the CPU: the one in-process engine
    assert load(device="cpu", gpus=3) == [0, 1, 2]  # CPU worker processes
    with pytest.raises(JobError, match=r"^engine.gpus: 5 asked for, but only 4 GPU\(s\) are visible$"):
        load(gpus=5)
    with pytest.raises(JobError, match=r"^engine.gpus: \[0, 4\] asked for, but only 4 GPU\(s\) are visible$"):
        load(gpus="[0,4]")
    with pytest.raises(JobError, match="^engine.gpus: a list of GPU ids needs a GPU"):
        load(device="cpu", gpus="[0,1]")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load() == [0] and load(gpus=1) == [0]  # no GPU: the one in-process engine, as before
