"""engine.gpus: one engine worker process per device. On the CPU, `engine.device: cpu` with `gpus: 2` runs two
CPU worker processes over the tiny model: the same rows as one engine, each id once, a dead worker reported
and resumed, SIGTERM, shards and status."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from batchvl.cli import main
from batchvl.config import JobError, load_job
from batchvl.io.shards import Shard
from batchvl.run import progress
from batchvl.run.progress import Progress

from .conftest import base_job, write_job, write_jsonl
from .test_robustness import REPO, by_id, spawn


def rows(n: int) -> list[dict]:
    """n rows, then a second row with the id r03 (an error row keyed `r03#dup@rows.jsonl:<n+1>`)."""
    return [{"id": f"r{i:02d}", "prompt": f"row number {i} says"} for i in range(n)] + [{"id": "r03", "prompt": "x"}]

COLUMNS = ("text", "error", "finish_reason", "prompt_tokens", "output_tokens")


def gpus_job(tmp_path, tiny_model, out, gpus, records=None, new_tokens=8):
    inp = write_jsonl(tmp_path / "rows.jsonl", records or rows(12))
    # small batches, parts and read-ahead, so that both workers get rows and commit several parts each
    job = base_job(tiny_model, inp, tmp_path / out, input={"image_column": None},
                   generation={"max_new_tokens": new_tokens}, engine={"max_batch_size": 2, "gpus": gpus},
                   output={"rows_per_file": 2}, media={"prefetch": 2})
    return write_job(tmp_path / f"job-{out}.yaml", job)


def rows_of(out) -> dict[str, tuple]:
    return {k: tuple(r[c] for c in COLUMNS) for k, r in by_id(out).items()}


@pytest.fixture(scope="session")
def one_engine(tiny_model, tmp_path_factory):
    """The rows of a single-engine run (gpus 1: in this process, no workers) over `rows(n)`; once per n."""
    seen: dict[int, dict[str, tuple]] = {}

    def run(n: int) -> dict[str, tuple]:
        if n not in seen:
            folder = tmp_path_factory.mktemp("one-engine")
            job = gpus_job(folder, tiny_model, "one", 1, rows(n))
            assert main(["run", str(job), "--quiet"]) == 0
            assert not [p for p in (folder / "one").glob("part-*") if "-cpu" in p.name]
            seen[n] = rows_of(folder / "one")
        return seen[n]
    return run


def test_two_workers_give_the_rows_of_one_engine_each_id_once(tiny_model, tmp_path, one_engine, capsys):
    job = gpus_job(tmp_path, tiny_model, "two", 2)
    assert main(["run", str(job), "--quiet"]) == 0
    assert "12 rows ok, 1 failed, 0 already done" in capsys.readouterr().out
    assert rows_of(tmp_path / "two") == one_engine(12)  # by_id also checks that no id is there twice
    assert one_engine(12)["r03#dup@rows.jsonl:13"][1] == "input: duplicate id 'r03' (first at rows.jsonl:4)"
    parts = [p.name for p in (tmp_path / "two").glob("part-*.parquet")]
    assert {w for w in ("cpu0", "cpu1") if any(f"-{w}-" in p for p in parts)} == {"cpu0", "cpu1"}
    summary = json.loads((tmp_path / "two" / "_summary.json").read_text())
    assert summary["state"] == "finished" and summary["rows_ok"] == 12 and summary["rows_this_run"] == 13
    assert summary["failed_by_kind"] == {"input": 1}

    assert main(["run", str(job), "--quiet"]) == 0  # a rerun finds nothing to do, and starts no worker
    assert "0 rows ok, 0 failed, 13 already done" in capsys.readouterr().out
    assert main(["status", str(tmp_path / "two")]) == 0
    assert f"13 rows in {len(parts)} part file(s)" in capsys.readouterr().out


def test_a_shard_spreads_over_the_workers(tiny_model, tmp_path, one_engine, capsys):
    records = rows(24)
    job = gpus_job(tmp_path, tiny_model, "out", 2, records)
    assert main(["run", str(job), "--quiet", "--shard", "1/2"]) == 0  # two workers share shard 1
    assert main(["run", str(job), "--quiet", "--shard", "0/2", "--set", "engine.gpus=1"]) == 0
    capsys.readouterr()
    parts = [p.name for p in (tmp_path / "out").glob("part-*.parquet")]
    assert any("-cpu0-" in p for p in parts) and any("-cpu1-" in p for p in parts)
    assert rows_of(tmp_path / "out") == one_engine(24)
    assert main(["status", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    owned = [sum(Shard(i, 2).owns(r["id"]) for r in records) for i in range(2)]
    assert f"shard 0/2: {owned[0]}/{owned[0]} rows (100.0%), finished" in out
    assert f"shard 1/2: {owned[1]}/{owned[1]} rows (100.0%), finished" in out


def test_a_dead_worker_is_reported_and_a_rerun_completes_each_id_once(tiny_model, tmp_path, one_engine):
    job = gpus_job(tmp_path, tiny_model, "out", 2)
    proc = spawn(job, "kill:batch:2@cpu1")  # cpu1 dies before its second batch; cpu0 runs on
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    lost = re.fullmatch(r"batchvl: error: engine worker cpu1 died \(exit code -9, SIGKILL\) with (\d+) row\(s\) not "
                        r"written; 1 of 2 workers failed, the others ran to the end; rerun the same command to run the "
                        r"rows not written", last)
    assert lost, err
    done = by_id(tmp_path / "out")
    assert 0 < len(done) < 13 and len(done) + int(lost[1]) == 13  # cpu0 took all the rest
    assert len([p for p in (tmp_path / "out").glob("part-*.parquet") if "-cpu1-" in p.name]) <= 1
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["state"] == "failed"

    proc = spawn(job)  # the same command, both workers again
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert rows_of(tmp_path / "out") == one_engine(12)


def test_sigterm_stops_the_workers_cleanly_and_a_rerun_resumes(tiny_model, tmp_path, one_engine):
    job = gpus_job(tmp_path, tiny_model, "out", 2, rows(24))
    proc = spawn(job)
    deadline = time.time() + 180
    while not list((tmp_path / "out").glob("part-*.parquet")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM after" in err.strip().splitlines()[-1]
    done = by_id(tmp_path / "out")
    assert 0 < len(done) < 25
    assert len([i for i in done if "#dup@" not in i]) % 2 == 0  # whole batches only, each committed by its worker
    assert not list((tmp_path / "out").glob(".tmp-*"))
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["state"] == "interrupted"
    assert main(["run", str(job), "--quiet", "--set", "engine.gpus=1"]) == 0  # resumable by any engine count
    assert rows_of(tmp_path / "out") == one_engine(24)


def test_workers_exit_when_the_coordinator_is_killed_and_a_rerun_completes(tiny_model, tmp_path, one_engine):
    job = gpus_job(tmp_path, tiny_model, "out", 2, rows(24))
    mark = f"BATCHVL_TEST_MARK={tmp_path}"  # finds this test's processes in /proc
    env = {**os.environ, "PYTHONPATH": str(REPO), "BATCHVL_FAULT": "kill:read:14", "BATCHVL_TEST_MARK": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "batchvl", "run", str(job), "--quiet"], env=env, timeout=180,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # the coordinator, as it reads row 14
    deadline = time.time() + 20
    while _processes_with(mark):
        assert time.time() < deadline, "engine workers outlived their coordinator"
        time.sleep(0.1)
    assert len(by_id(tmp_path / "out")) < 25
    assert main(["run", str(job), "--quiet", "--set", "engine.gpus=1"]) == 0
    assert rows_of(tmp_path / "out") == one_engine(24)


def _processes_with(env_entry: str) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if env_entry.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours
            continue
    return found


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


def test_the_bar_shows_each_workers_rate(monkeypatch):
    monkeypatch.setattr(progress, "_is_terminal", lambda stream: True)  # a bar (a log file gets log lines)
    bar = Progress(total=4, enabled=True, workers=["gpu0", "gpu1"])
    bar.worker_ready("gpu0")
    bar.worker_ready("gpu1")
    bar.add(2, 2, 10, 0, "gpu0")
    bar.add(1, 0, 0, 1, "gpu1")
    assert bar.bar.n == 3 and bar.errors == 1
    assert re.search(r"errors=1 gpu0 [0-9.]+/s gpu1 [0-9.]+/s$", bar.bar.postfix), bar.bar.postfix
    bar.close()
