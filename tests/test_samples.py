"""generation.n: several samples per input row, each an output row with its `sample` index, written exactly once
per (id, sample) across a kill and a rerun, each drawn from its own seed whatever the batch; n is part of the
fingerprint, and n > 1 with greedy decoding is refused."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchvl.cli import main

from .conftest import base_job, random_image, write_job, write_jsonl

N = 3
ROWS = [{"id": "pic", "prompt": "Describe it.", "image": "a.png", "sample": "an input column"},
        {"id": "txt", "prompt": "Say something.", "image": None},
        {"id": "bad", "prompt": "Describe it.", "image": "missing.png"}]


def sample_job(tmp_path: Path, model: Path, out: str, **sections) -> Path:
    """A sampling job on the native engine, whose per-row seeds make a sample's text independent of its batch."""
    if not (tmp_path / "a.png").exists():
        random_image(120, 90).save(tmp_path / "a.png")
        write_jsonl(tmp_path / "rows.jsonl", ROWS)
    job = base_job(model, tmp_path / "rows.jsonl", tmp_path / out,
                   generation={"max_new_tokens": 4, "temperature": 1.0, "n": N},
                   engine={"backend": "native", "max_batch_size": 2}, output={"rows_per_file": 2})
    for key, value in sections.items():
        job[key].update(value)
    return write_job(tmp_path / f"{out}.yaml", job)


class Crash(BaseException):
    """What the `write` fault point raises here instead of SIGKILLing the process (see crash_at_second_part)."""


def crash_at_second_part(monkeypatch) -> None:
    """Make the run die as `BATCHVL_FAULT=kill:write:2` kills it: its second part file written but never renamed
    into place, and nothing committed after. In-process (a Crash out of the fault point, at that part and at the
    last-rows commit the dying run then tries), as a subprocess and its imports cost seconds; the SIGKILL itself
    is tests/test_robustness.py's and test_output_formats.py's."""
    parts = []

    def fault_point(name: str) -> None:
        parts.append(name == "write")
        if sum(parts) >= 2:
            raise Crash

    monkeypatch.setattr("batchvl.run.output.fault_point", fault_point)


def samples(out: Path) -> list[tuple[str, int, str | None, str | None]]:
    """(id, sample, text, error) of every output row, sorted."""
    return sorted((r["id"], r["sample"], r["text"], r["error"]) for r in pq.read_table(out).to_pylist())


def test_a_crash_mid_row_resumes_only_its_missing_samples_and_each_sample_is_its_own_seeds(tiny_model, tmp_path,
                                                                                            capsys, monkeypatch):
    job = sample_job(tmp_path, tiny_model, "out")
    with monkeypatch.context() as m:
        crash_at_second_part(m)  # parts of 2 rows: pic's samples 0 and 1 are written, its sample 2 is not
        with pytest.raises(Crash):
            main(["run", str(job), "--quiet"])
    assert [(i, k) for i, k, _, _ in samples(tmp_path / "out")] == [("pic", 0), ("pic", 1)]
    assert main(["run", str(job), "--quiet"]) == 0
    assert "4 rows ok, 3 failed, 2 already done" in capsys.readouterr().out  # pic's sample 2 ran, not its 0 and 1
    got = samples(tmp_path / "out")
    assert [(i, k) for i, k, _, _ in got] == [(i, k) for i in ("bad", "pic", "txt") for k in range(N)]  # each once
    assert all(t is None and e.startswith("media: no such file") for i, _, t, e in got if i == "bad")
    texts = {(i, k): t for i, k, t, _ in got if i != "bad"}
    assert len({texts["pic", k] for k in range(N)}) > 1 and len({texts["txt", k] for k in range(N)}) > 1

    # The same job again, into a folder of its own, its rows in batches of 5 rather than 2, uninterrupted: the
    # same text for every (id, sample), whatever batch the sample ran in and whichever run wrote it.
    again = sample_job(tmp_path, tiny_model, "again", engine={"max_batch_size": 5})
    assert main(["run", str(again), "--quiet"]) == 0
    assert samples(tmp_path / "again") == got

    capsys.readouterr()
    assert main(["run", str(job), "--quiet", "--set", "generation.n=2"]) == 2  # one folder, one n
    err = capsys.readouterr().err
    assert "generation.n: 3 -> 2" in err and "--set generation.n=3" in err


def test_n_samples_with_greedy_decoding_are_refused_in_one_line_naming_the_key(tiny_model, tmp_path, capsys):
    job = sample_job(tmp_path, tiny_model, "out", generation={"temperature": 0.0})
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generation.n: 3 samples per row with greedy decoding" in err[0], err


@pytest.mark.parametrize("n", [1, 3])
def test_a_keep_column_named_sample_is_refused_only_when_n_is_above_one(tiny_model, tmp_path, capsys, n):
    """n: 1 keeps the output's schema as it was (no `sample` column), so a keep column may still be called
    `sample`; with n > 1 that name is the output's own, and the job is refused naming the keep column."""
    job = sample_job(tmp_path, tiny_model, "out", generation={"n": n}, output={"keep_columns": ["sample"]})
    assert main(["validate", str(job)]) == (0 if n == 1 else 2)
    if n > 1:
        assert "output.keep_columns[0]: 'sample' is an output column of its own" in capsys.readouterr().err
