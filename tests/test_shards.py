"""`--shard I/N`: independent processes cover the input exactly once in one output folder; `batchvl status`."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from batchvl.cli import main
from batchvl.io.shards import Shard

from .conftest import base_job, write_job, write_jsonl


def test_shards_partition_ids_stably():
    shards = [Shard(i, 3) for i in range(3)]
    ids = [f"row-{i}" for i in range(3000)]
    owners = [[s.owns(i) for s in shards].count(True) for i in ids]
    assert owners == [1] * len(ids)  # every id in exactly one shard
    sizes = [sum(s.owns(i) for i in ids) for s in shards]
    assert all(800 < n < 1200 for n in sizes)  # and the shards are balanced
    assert [Shard(1, 3).owns(i) for i in ids[:50]] == [Shard.parse("1/3").owns(i) for i in ids[:50]]


@pytest.mark.parametrize("text", ["3/3", "1", "a/b", "-1/2", "0/0"])
def test_bad_shard_is_a_one_line_error(text, tiny_model, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out", input={"image_column": None}))
    assert main(["run", str(job), "--quiet", f"--shard={text}"]) == 2
    assert capsys.readouterr().err.startswith("batchvl: error: --shard:")


def test_two_shards_cover_the_input_once_and_match_an_unsharded_run(tiny_model, tmp_path, capsys):
    rows = [{"id": f"r{i}", "prompt": f"row {i}"} for i in range(12)]
    inp = write_jsonl(tmp_path / "rows.jsonl", rows)
    sections = dict(input={"image_column": None}, generation={"max_new_tokens": 6})
    write_job(tmp_path / "all.yaml", base_job(tiny_model, inp, tmp_path / "all", **sections))
    write_job(tmp_path / "sharded.yaml", base_job(tiny_model, inp, tmp_path / "sharded", **sections))
    assert main(["run", str(tmp_path / "all.yaml"), "--quiet"]) == 0
    for shard in ("1/2", "0/2", "1/2"):  # the last one is a rerun: it must add nothing
        assert main(["run", str(tmp_path / "sharded.yaml"), "--quiet", "--shard", shard]) == 0
    capsys.readouterr()
    sharded = pq.read_table(tmp_path / "sharded").to_pylist()
    assert sorted(r["id"] for r in sharded) == sorted(r["id"] for r in rows)  # each id exactly once
    clean = {r["id"]: r["text"] for r in pq.read_table(tmp_path / "all").to_pylist()}
    assert {r["id"]: r["text"] for r in sharded} == clean

    assert main(["status", str(tmp_path / "sharded")]) == 0
    out = capsys.readouterr().out
    owned = [sum(Shard(i, 2).owns(r["id"]) for r in rows) for i in range(2)]
    assert "12 rows" in out
    assert f"shard 0/2: {owned[0]}/{owned[0]} rows (100.0%), finished" in out
    assert f"shard 1/2: {owned[1]}/{owned[1]} rows (100.0%), finished" in out
