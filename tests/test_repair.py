"""Damaged part files: a committed part that a failing disk or an interrupted copy truncated or zeroed stops a
run with one line naming it (never silently, never a traceback), `batchvl status` reports it, and `batchvl
repair` moves it aside so that a rerun runs its rows again, each id once, with the text they had."""

from __future__ import annotations

import pyarrow.parquet as pq

from batchvl.cli import main
from batchvl.io.durable import Owner
from batchvl.io.lease import Lease, Scope

from .conftest import base_job, write_job, write_jsonl


def texts(out) -> dict[str, str]:
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len({r["id"] for r in rows}), "an id appears more than once"
    return {r["id"]: r["text"] for r in rows}


def test_a_damaged_part_stops_the_run_naming_it_and_repair_moves_it_aside(tiny_model, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"row {i}"} for i in range(6)])
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, rows, out, input={"image_column": None},
                                                    output={"rows_per_file": 2}, generation={"max_new_tokens": 4},
                                                    engine={"max_batch_size": 2}))
    assert main(["run", str(job), "--quiet"]) == 0
    clean = texts(out)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3
    truncated, zeroed, intact = parts
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    zeroed.write_bytes(bytes(zeroed.stat().st_size))
    capsys.readouterr()

    assert main(["run", str(job), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the part file {truncated.name} cannot be read" in err
    assert "batchvl repair" in err and "Traceback" not in err

    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "2 rows in 1 part file(s)" in status and truncated.name in status and zeroed.name in status

    with Lease(out, Scope(1, 2), Owner.new()):  # a shard writing the folder: repair waits for no run
        assert main(["repair", str(out)]) == 2
        assert "is being written by another run: run " in capsys.readouterr().err
    assert main(["repair", str(out)]) == 0
    report = capsys.readouterr().out
    assert "2 damaged part file(s) moved aside" in report
    assert sorted(p.name for p in (out / "_damaged").iterdir()) == sorted([truncated.name, zeroed.name])
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [intact.name]

    assert main(["run", str(job), "--quiet"]) == 0  # the moved parts' four rows run again
    assert texts(out) == clean
    assert main(["repair", str(out)]) == 0 and "every part file reads" in capsys.readouterr().out
