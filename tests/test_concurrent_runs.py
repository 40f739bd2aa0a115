"""Runs at once on one output folder, as real concurrent processes: a second run of the folder is refused naming
the holder (or waits, --wait); shards of one count run side by side, one of them killed (-9) and restarted while
the others write, and end with every id once and the text of one unsharded run; clashing runs are refused."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from batchvl.cli import main
from batchvl.io.lease import read_holder

from .test_robustness import by_id, text_job

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"id": f"r{i:02d}", "prompt": f"row number {i} says"} for i in range(30)]


def job_file(tmp_path, tiny_model, out):
    return text_job(tmp_path, tiny_model, ROWS, out=out, generation={"max_new_tokens": 6},
                    engine={"max_batch_size": 2, "backend": "native"}, output={"rows_per_file": 2})


def spawn(job: Path, *args: str, fault: str | None = None, stderr: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("BATCHVL_FAULT", None)
    if fault:
        env["BATCHVL_FAULT"] = fault
    err = subprocess.PIPE if stderr is None else stderr.open("w")
    return subprocess.Popen([sys.executable, "-m", "batchvl", "run", str(job), "--quiet", *args], env=env,
                            stdout=subprocess.PIPE, stderr=err, text=True)


def wait_for(check, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not check():
        assert proc.poll() is None, f"exited before {what}: {proc.communicate()}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def refused(capsys, *argv: str) -> str:
    """Run batchvl here, beside the run holding the folder; it must be refused with one line. Returns the line."""
    assert main(["run", *argv, "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "Traceback" not in line
    return line


def test_a_second_run_of_a_folder_is_refused_or_waits_and_no_row_is_written_twice(tiny_model, tmp_path, capsys):
    job = job_file(tmp_path, tiny_model, "out")
    out = tmp_path / "out"
    first = spawn(job, fault="sleep:write:1:3")  # stalls with its first part half-written: then we freeze it
    wait_for(lambda: read_holder(out / "_lock.json") is not None and list(out.glob(".tmp-*~part-*")), first,
             "the first run's lease and temporary part")
    first.send_signal(signal.SIGSTOP)  # frozen: alive, holding the folder, writing nothing
    try:
        pid, read_run = read_holder(out / "_lock.json").pid, read_holder(out / "_lock.json").run
        for args in ([], ["--overwrite"], ["--retry-errors"], ["--shard", "0/2"]):
            line = refused(capsys, str(job), *args)
            assert line.startswith(f"batchvl: error: output.path: {out} is being written by another run: run ")
            assert f"pid {pid}," in line and "--wait" in line
        log = tmp_path / "waiting.log"
        waiting = spawn(job, "--wait", stderr=log)
        wait_for(lambda: "(--wait)" in log.read_text(), waiting, "the second run to wait for the first")
    finally:
        first.send_signal(signal.SIGCONT)
    code, printed, err = finish(first)
    assert code == 0 and "30 rows ok, 0 failed, 0 already done" in printed, err
    code, printed, _ = finish(waiting)
    assert code == 0 and "0 rows ok, 0 failed, 30 already done" in printed, log.read_text()
    assert f"waiting for run {read_run} (unsharded, host " in log.read_text()
    assert sorted(by_id(out)) == [r["id"] for r in ROWS]  # each id once
    assert not list(out.glob("_lock*")) and not list(out.glob(".tmp-*"))


def test_shards_at_once_one_killed_and_restarted_give_every_id_once_and_the_unsharded_text(tiny_model, tmp_path,
                                                                                           capsys):
    job = job_file(tmp_path, tiny_model, "out")
    out = tmp_path / "out"
    killed = spawn(job, "--shard", "0/3", fault="kill:write:2")  # dies with its second part half-written
    slow = spawn(job, "--shard", "1/3", fault="sleep:write:1:3")  # stalls in its first part's write: frozen there
    other = spawn(job, "--shard", "2/3")

    def slow_temps() -> list[Path]:
        holder = read_holder(out / "_lock-shard-1-of-3.json")
        return [p for p in out.glob(".tmp-*~part-*") if holder is not None and holder.run in p.name]

    wait_for(slow_temps, slow, "shard 1/3's temporary part")
    slow.send_signal(signal.SIGSTOP)
    try:
        slow_temp = slow_temps()
        assert len(slow_temp) == 1
        code, _, err = finish(killed)
        assert code == -signal.SIGKILL, err
        assert list(out.glob(".tmp-*~part-*")) != slow_temp  # the dead shard's half-written part is there too
        capsys.readouterr()
        assert main(["status", str(out)]) == 0
        status = capsys.readouterr().out
        assert re.search(r"^shard 0/3: 2/\d+ rows \(.*\), dead \(run .* is gone: killed\); rerun to resume", status,
                         re.M), status
        slow_run = read_holder(out / "_lock-shard-1-of-3.json").run
        assert f"shard 1/3: nothing committed yet, running (run {slow_run}, host " in status
        for args in (["--shard", "1/3"], ["--shard", "0/2"], [], ["--shard", "2/3", "--retry-errors"]):
            assert "is being written by another run" in refused(capsys, str(job), *args)
        assert main(["run", str(job), "--quiet", "--shard", "0/3"]) == 0  # restarted beside the frozen sibling
        assert slow_temp[0].exists()  # its part in the middle of its write survived the restart beside it
    finally:
        slow.send_signal(signal.SIGCONT)
    for name, proc in (("1/3", slow), ("2/3", other)):
        code, _, err = finish(proc)
        assert code == 0, (name, err)
    clean = job_file(tmp_path, tiny_model, "clean")
    assert main(["run", str(clean), "--quiet"]) == 0
    texts = {k: r["text"] for k, r in by_id(out).items()}  # by_id: each id at most once
    assert texts == {k: r["text"] for k, r in by_id(tmp_path / "clean").items()}
    assert not list(out.glob("_lock*")) and not list(out.glob(".tmp-*"))
