"""Refusing a changed job, --retry-errors, duplicate ids, signals, kill -9 at fault points, _summary.json,
out-of-memory splitting and write failures."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from batchvl.cli import main

from .conftest import base_job, random_image, write_job, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def text_job(tmp_path, tiny_model, rows, out="out", **sections):
    inp = write_jsonl(tmp_path / "rows.jsonl", rows)
    job = base_job(tiny_model, inp, tmp_path / out, input={"image_column": None}, **sections)
    return write_job(tmp_path / f"job-{out}.yaml", job)


def output(out: Path) -> list[dict]:
    return pq.read_table(out).to_pylist() if list(out.glob("part-*.parquet")) else []


def by_id(out: Path) -> dict[str, dict]:
    rows = output(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id appears more than once"
    return {r["id"]: r for r in rows}


def test_changed_job_is_refused_and_overwrite_starts_over(tiny_model, tmp_path, capsys):
    job = text_job(tmp_path, tiny_model, [{"id": "a", "prompt": "hi"}], generation={"max_new_tokens": 4})
    assert main(["run", str(job), "--quiet"]) == 0
    fp = json.loads((tmp_path / "out" / "_batchvl.json").read_text())["job"]
    assert fp["generation.max_new_tokens"] == 4 and "engine.max_batch_size" not in fp
    capsys.readouterr()

    assert main(["run", str(job), "--quiet", "--set", "generation.max_new_tokens=6"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("batchvl: error: output.path: ") and "was written with a different job" in err
    assert "(generation.max_new_tokens: 4 -> 6)" in err and "use --overwrite to start over" in err
    assert main(["validate", str(job), "--set", "media.max_dynamic_patch=2"]) == 2
    assert "media.max_dynamic_patch: 12 -> 2" in capsys.readouterr().err

    # settings that do not change results do not count
    for setting in ("engine.max_batch_size=1", "media.prefetch=5", "media.prepare_threads=2",
                    "output.rows_per_file=7", "engine.dtype=float32", "media.max_dynamic_patch=12"):
        assert main(["run", str(job), "--quiet", "--set", setting]) == 0, setting
    assert "0 rows ok, 0 failed, 1 already done" in capsys.readouterr().out

    assert main(["run", str(job), "--quiet", "--overwrite", "--set", "generation.max_new_tokens=6"]) == 0
    assert json.loads((tmp_path / "out" / "_batchvl.json").read_text())["job"]["generation.max_new_tokens"] == 6
    assert list(by_id(tmp_path / "out")) == ["a"]
    assert main(["run", str(job), "--quiet"]) == 2  # now the old setting is the different one


def test_the_backend_is_part_of_the_fingerprint_but_a_key_an_older_folder_lacks_is_not(tiny_model, tmp_path, capsys):
    job = text_job(tmp_path, tiny_model, [{"id": "a", "prompt": "hi"}], generation={"max_new_tokens": 4})
    assert main(["run", str(job), "--quiet"]) == 0  # the transformers backend (text_job's)
    capsys.readouterr()
    # The two backends sample from different random generators: one folder must not mix their rows.
    assert main(["run", str(job), "--quiet", "--set", "engine.backend=native"]) == 2
    assert "(engine.backend: 'transformers' -> 'native')" in capsys.readouterr().err
    # A folder written before the backend was recorded resumes under either backend.
    path = tmp_path / "out" / "_batchvl.json"
    recorded = json.loads(path.read_text())
    del recorded["job"]["engine.backend"]
    path.write_text(json.dumps(recorded))
    assert main(["run", str(job), "--quiet", "--set", "engine.backend=native"]) == 0
    assert "1 already done" in capsys.readouterr().out


def test_retry_errors_runs_failed_rows_again(tiny_model, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": "describe", "image": f"{i}.png"}
                                                for i in range(4)])
    for i in (0, 1, 3):
        random_image(64, 48, seed=i).save(tmp_path / f"{i}.png")
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out",
                                                    generation={"max_new_tokens": 4}, output={"rows_per_file": 2}))
    assert main(["run", str(job), "--quiet"]) == 0
    first = by_id(tmp_path / "out")
    assert first["r2"]["error"].startswith("media:") and first["r2"]["text"] is None
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows_ok"] == 3 and summary["failed_by_kind"] == {"media": 1}

    assert main(["run", str(job), "--quiet"]) == 0  # a plain rerun leaves error rows alone
    assert by_id(tmp_path / "out")["r2"]["error"] is not None
    random_image(64, 48, seed=2).save(tmp_path / "2.png")
    capsys.readouterr()
    assert main(["run", str(job), "--quiet", "--retry-errors"]) == 0
    assert "1 rows ok, 0 failed, 3 already done" in capsys.readouterr().out
    after = by_id(tmp_path / "out")
    assert sorted(after) == ["r0", "r1", "r2", "r3"]
    assert after["r2"]["error"] is None and after["r2"]["text"] is not None
    assert all(after[k] == first[k] for k in ("r0", "r1", "r3"))
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows_ok"] == 4 and summary["rows_failed"] == 0 and summary["state"] == "finished"


def test_duplicate_ids_keep_the_first_and_become_keyed_error_rows(tiny_model, tmp_path):
    rows = [{"id": "x", "prompt": "one"}, {"id": "y", "prompt": "two"}, {"id": "x", "prompt": "three"},
            {"id": "x", "prompt": "four"}]
    job = text_job(tmp_path, tiny_model, rows, generation={"max_new_tokens": 4})
    assert main(["run", str(job), "--quiet"]) == 0
    out = by_id(tmp_path / "out")
    assert sorted(out) == ["x", "x#dup@rows.jsonl:3", "x#dup@rows.jsonl:4", "y"]
    assert out["x"]["error"] is None
    assert out["x#dup@rows.jsonl:3"]["error"] == "input: duplicate id 'x' (first at rows.jsonl:1)"
    assert out["x#dup@rows.jsonl:4"]["finish_reason"] == "error"
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows_ok"] == 2 and summary["failed_by_kind"] == {"input": 2}
    assert main(["run", str(job), "--quiet"]) == 0  # a rerun adds nothing
    assert main(["run", str(job), "--quiet", "--retry-errors"]) == 0  # duplicates stay reported, once
    assert by_id(tmp_path / "out") == out


CRASH_ROWS = [{"id": f"r{i:02d}", "prompt": f"row number {i} says"} for i in range(12)]


@pytest.fixture(params=["transformers", "native"])
def backend(request) -> str:
    """The crash, signal and out-of-memory tests run on both engines."""
    return request.param


def crash_job(tmp_path, tiny_model, out, rows=CRASH_ROWS, new_tokens=8, backend="transformers"):
    """On the native engine with refill on (forced here; `auto` would refill these rows too, as nothing holds them to
    one length): its calls take several batches' worth of rows, the path where a crash or a signal could lose the
    most."""
    engine = {"max_batch_size": 2, "backend": backend, **({"refill": True} if backend == "native" else {})}
    return text_job(tmp_path, tiny_model, rows, out=out, generation={"max_new_tokens": new_tokens},
                    engine=engine, output={"rows_per_file": 2})


def spawn(job: Path, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("BATCHVL_FAULT", None)
    if fault:
        env["BATCHVL_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "batchvl", "run", str(job), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def clean_texts(tiny_model, tmp_path, backend):
    def run(rows=CRASH_ROWS, new_tokens=8):
        job = crash_job(tmp_path, tiny_model, "clean", rows, new_tokens, backend)
        assert main(["run", str(job), "--quiet"]) == 0
        return {k: r["text"] for k, r in by_id(tmp_path / "clean").items()}
    return run


def test_sigterm_finishes_the_batch_in_flight_and_resumes(tiny_model, tmp_path, clean_texts, backend):
    rows = [{"id": f"r{i:02d}", "prompt": f"row number {i} says"} for i in range(24)]  # 12 batches; 3 native calls
    job = crash_job(tmp_path, tiny_model, "out", rows, new_tokens=16, backend=backend)
    proc = spawn(job)
    deadline = time.time() + 120
    while not list((tmp_path / "out").glob("part-*.parquet")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM after" in last and "to resume, run the same command: batchvl run" in last
    done = by_id(tmp_path / "out")
    # Whole engine calls only, in row order: a prefix of the rows. (How many rows a call holds varies: with refill
    # the engine gets a batch plus the rows already prepared, up to 4 batches' worth, so the count may be odd.)
    assert 0 < len(done) < len(rows) and set(done) == {f"r{i:02d}" for i in range(len(done))}
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["state"] == "interrupted"
    assert main(["run", str(job), "--quiet"]) == 0
    assert {k: r["text"] for k, r in by_id(tmp_path / "out").items()} == clean_texts(rows, 16)


# batch:2, as the native engine gets 8 of the 12 rows in a call (refill): there is no third
@pytest.mark.parametrize("fault", ["read:5", "batch:2", "write:2"])
def test_kill_9_at_a_fault_point_then_rerun_gives_every_row_once(tiny_model, tmp_path, clean_texts, fault,
                                                                backend):
    job = crash_job(tmp_path, tiny_model, "out", backend=backend)
    proc = spawn(job, f"kill:{fault}")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    killed_with = len(output(tmp_path / "out"))
    assert killed_with < len(CRASH_ROWS)
    if fault == "write:2":
        assert list((tmp_path / "out").glob(".tmp-*~part-*")) and killed_with == 2
    assert main(["run", str(job), "--quiet"]) == 0
    assert not list((tmp_path / "out").glob(".tmp-*"))
    assert {k: r["text"] for k, r in by_id(tmp_path / "out").items()} == clean_texts()


def test_out_of_memory_splits_the_batch_down_to_one_row(tiny_model, tmp_path, monkeypatch, backend):
    import batchvl.run.loop as runner

    real = runner.make_engine
    sizes, handling = [], []

    class Flaky:
        def __init__(self, engine):
            self.engine = engine

        def generate(self, requests):
            sizes.append(len(requests))
            # A retry must not run inside the handler of the last failure: that exception's frames would
            # keep the failed attempt's device memory alive (seen on the GPU: a cascade down to one row).
            handling.append(sys.exc_info()[0])
            if len(requests) > 1 or requests[0].id == "r3":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
            return self.engine.generate(requests)

        def out_of_memory(self, rows):
            pass  # not the engine's own: it keeps its batch size, so each batch splits all the way down

        def close(self):
            self.engine.close()

    monkeypatch.setattr(runner, "make_engine", lambda *a, **k: Flaky(real(*a, **k)))
    rows = [{"id": f"r{i}", "prompt": f"row {i}"} for i in range(5)]
    refill = {"refill": True} if backend == "native" else {}
    job = text_job(tmp_path, tiny_model, rows, generation={"max_new_tokens": 4},
                   engine={"max_batch_size": 5, "backend": backend, **refill})
    assert main(["run", str(job), "--quiet"]) == 0
    assert sizes == [5, 2, 1, 1, 3, 1, 2, 1, 1]
    assert handling == [None] * len(sizes)
    out = by_id(tmp_path / "out")
    assert sorted(out) == [f"r{i}" for i in range(5)]
    assert out["r3"]["error"].startswith("oom: device out of memory for this row alone")
    assert all(out[f"r{i}"]["text"] is not None for i in (0, 1, 2, 4))


def test_the_native_engine_sizes_itself_down_after_running_out_of_memory(tiny_model, tmp_path, monkeypatch,
                                                                         caplog):
    """On the H200 (BENCHMARKS.md), a batch of 1,024 rows of the 8B shape ran out of memory; the cache it had
    allocated stayed, so every later batch ran out of memory too, down to 16 rows. The engine now halves its
    batch size and frees its cache on each out-of-memory, so later batches are cut to a size that fits."""
    from batchvl.engine.native import NativeEngine

    real, ran = NativeEngine._run, []

    def run(self, requests):
        ran.append(len(requests))
        if len(requests) > 2:  # what fits on this pretend device
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(self, requests)

    monkeypatch.setattr(NativeEngine, "_run", run)
    rows = [{"id": f"r{i:02d}", "prompt": f"row {i}"} for i in range(24)]
    job = text_job(tmp_path, tiny_model, rows, generation={"max_new_tokens": 3},
                   engine={"max_batch_size": 8, "backend": "native", "refill": False})
    assert main(["run", str(job), "--quiet"]) == 0
    assert ran == [8, 4, 2, 2, 2, 2] + [2] * 8  # two out-of-memory errors, then batches cut to 2 rows
    assert "now runs at most 2 rows at once" in caplog.text
    out = by_id(tmp_path / "out")
    assert sorted(out) == [r["id"] for r in rows] and all(r["error"] is None for r in out.values())


def test_a_refilling_engine_sizes_its_slots_down_after_running_out_of_memory(tiny_model, tmp_path, monkeypatch,
                                                                            caplog):
    """The same with refill: the batch's slots (what the cache is sized for) halve on each out-of-memory,
    while the rows of the failed call are split and rerun, none lost."""
    from batchvl.engine.native import NativeEngine
    from batchvl.prepare.prefetch import Prefetcher

    real, slots = NativeEngine.start, []

    def start(self, n, need):
        slots.append(n)
        if n > 2:  # what fits on this pretend device
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(self, n, need)

    monkeypatch.setattr(NativeEngine, "start", start)
    monkeypatch.setattr(Prefetcher, "ready", lambda self: True)  # all 24 rows in the first call, whatever the timing
    rows = [{"id": f"r{i:02d}", "prompt": f"row {i}", "limit": 1 + i % 3} for i in range(24)]
    inp = write_jsonl(tmp_path / "rows.jsonl", rows)  # rows of 1 to 3 new tokens: slots free at different steps
    job = write_job(tmp_path / "job.yaml", base_job(
        tiny_model, inp, tmp_path / "out", generation={"max_new_tokens": 3},
        input={"image_column": None, "max_new_tokens_column": "limit"},
        engine={"max_batch_size": 8, "backend": "native", "refill": True}))
    assert main(["run", str(job), "--quiet"]) == 0
    # All 24 rows in one call (four batches' worth): 8 slots fail, then 4 for the first half, then 2 from then on.
    assert slots == [8, 4, 2, 2, 2]
    assert "now runs at most 2 rows at once" in caplog.text
    out = by_id(tmp_path / "out")
    assert sorted(out) == [r["id"] for r in rows] and all(r["error"] is None for r in out.values())


def test_write_failure_stops_with_exit_1_and_stays_resumable(tiny_model, tmp_path, monkeypatch, capsys):
    import errno

    import batchvl.io.writer as writer

    real = writer.pq.write_table
    calls = []

    def failing(table, where, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(writer.pq, "write_table", failing)
    rows = [{"id": f"r{i}", "prompt": f"row {i}"} for i in range(6)]
    job = text_job(tmp_path, tiny_model, rows, generation={"max_new_tokens": 4}, output={"rows_per_file": 2},
                   engine={"max_batch_size": 2})
    assert main(["run", str(job), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("batchvl: error: output.path: cannot write to ")
    assert "No space left on device" in err
    assert sorted(by_id(tmp_path / "out")) == ["r0", "r1"]
    assert not list((tmp_path / "out").glob(".tmp-*"))
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["state"] == "failed"  # not "finished"
    monkeypatch.setattr(writer.pq, "write_table", real)
    assert main(["run", str(job), "--quiet"]) == 0
    assert sorted(by_id(tmp_path / "out")) == [f"r{i}" for i in range(6)]


def test_a_rerun_with_every_row_written_loads_no_model_and_says_so(tiny_model, tmp_path, monkeypatch, caplog):
    import batchvl.run.local as local

    rows = [{"id": f"r{i}", "prompt": f"row {i}"} for i in range(5)]
    job = text_job(tmp_path, tiny_model, rows, generation={"max_new_tokens": 2})
    assert main(["run", str(job), "--quiet"]) == 0
    before = by_id(tmp_path / "out")
    loads = []
    real = local.build_engine
    monkeypatch.setattr(local, "build_engine", lambda *a: loads.append(1) or real(*a))
    caplog.set_level(logging.INFO, logger="batchvl")
    for args in ([], ["--shard", "0/2"], ["--shard", "1/2"]):
        assert main(["run", str(job), "--quiet", *args]) == 0
    assert loads == [] and caplog.text.count("the model was not loaded") == 3
    assert by_id(tmp_path / "out") == before
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["state"] == "finished"
    # One row more in the input: now there is work, and the model loads for it alone.
    write_jsonl(tmp_path / "rows.jsonl", [*rows, {"id": "r5", "prompt": "row 5"}])
    assert main(["run", str(job), "--quiet"]) == 0
    assert loads == [1] and sorted(by_id(tmp_path / "out")) == [f"r{i}" for i in range(6)]
