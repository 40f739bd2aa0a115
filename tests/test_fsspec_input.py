"""input.path as an fsspec URL (memory://, which is process-global, so an in-process run sees it), brace ranges,
and `.tar.gz` WebDataset shards: the rows, ids and output are those of the same files read from a local path."""

from __future__ import annotations

import gzip
import importlib.util
import json
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchvl.cli import main
from batchvl.errors import JobError
from batchvl.io.readers import columns_of, count_rows

from .conftest import base_job, random_image, write_job
from .test_input_formats import job_for, png_bytes, rows_of, write_shard
from .test_robustness import by_id


@pytest.fixture
def bucket():
    """A fresh memory:// folder, removed afterwards (the memory filesystem lives as long as the process)."""
    name = f"memory://bucket-{uuid.uuid4().hex[:8]}"
    yield name
    fs = fsspec.filesystem("memory")
    if fs.exists(name):
        fs.rm(name, recursive=True)


def mirror(local: Path, url: str) -> None:
    """Copy a local folder's files to the same paths below a URL."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        with fsspec.open(f"{url}/{path.relative_to(local).as_posix()}", "wb") as f:
            f.write(path.read_bytes())


def data_folder(tmp_path: Path) -> Path:
    """Two WebDataset shards (one with a sample whose json member is broken), a gzip JSONL file whose images
    are paths relative to it, and those images."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    write_shard(data / "000.tar", [{"__key__": "a", "png": png_bytes(1), "txt": b"a red cat"},
                                   {"__key__": "b", "png": png_bytes(2), "json": b"{broken"}])
    write_shard(data / "001.tar", [{"__key__": "c", "png": png_bytes(3), "txt": b"a dog"}])
    random_image(50, 40, seed=4).save(data / "img" / "d.png")
    lines = [{"txt": "a chart", "image": "img/d.png"}, {"txt": "a missing one", "image": "img/none.png"}]
    (data / "rows.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode()))
    return data


def test_a_url_glob_reads_the_rows_and_ids_of_the_same_local_files(tmp_path, bucket):
    data = data_folder(tmp_path)
    pq.write_table(pa.table({"id": [7, 8], "prompt": ["x", "y"]}), data / "t.parquet", row_group_size=1)
    (data / "t.csv").write_text("id,prompt\n1,hello\n2,a,b\n", encoding="utf-8")
    mirror(data, f"{bucket}/data")
    for pattern in ("*", "*.tar", "{000..001}.tar", "00[01].tar", "t.parquet", "t.csv", ""):
        local, url = job_for(tmp_path, data / pattern), job_for(tmp_path, f"{bucket}/data/{pattern}")
        want, got = rows_of(local), rows_of(url)
        assert [(r.id, r.data, r.error) for r in got] == [(r.id, r.data, r.error) for r in want], pattern
        assert count_rows(url.input.files) == count_rows(local.input.files) == len(want)
        assert columns_of(url.input.files[0]) == columns_of(local.input.files[0])
    by_file_url = job_for(tmp_path, f"file://{data}/*.tar")  # a file:// URL is the local path it names
    assert by_file_url.input.files == job_for(tmp_path, data / "*.tar").input.files
    shards = rows_of(job_for(tmp_path, f"{bucket}/data/*.tar"))
    assert [r.id for r in shards] == ["000.tar:a", "000.tar:b", "001.tar:c"]
    assert shards[1].data is None and "json member that is not JSON" in shards[1].error  # still an error row


def test_a_run_over_a_url_gives_the_local_runs_rows_and_resumes_after_a_failed_write(tiny_model, tmp_path, bucket,
                                                                                      monkeypatch, capsys):
    import errno

    import batchvl.io.writer as writer

    data = data_folder(tmp_path)
    mirror(data, f"{bucket}/data")

    def job(path: str, out: str) -> Path:
        spec = base_job(tiny_model, path, tmp_path / out, input={"id_column": None, "prompt_column": None},
                        prompt="Caption: {txt}", generation={"max_new_tokens": 4}, output={"rows_per_file": 2},
                        engine={"max_batch_size": 2})
        return write_job(tmp_path / f"{out}.yaml", spec)

    assert main(["run", str(job(str(data / "*"), "local")), "--quiet"]) == 0
    want = {i: (r["text"], r["error"]) for i, r in by_id(tmp_path / "local").items()}
    assert sorted(want) == ["000.tar:a", "000.tar:b", "001.tar:c", "rows.jsonl.gz:1", "rows.jsonl.gz:2"]
    assert want["rows.jsonl.gz:1"][1] is None and "img/none.png" in want["rows.jsonl.gz:2"][1]

    real, calls = writer.pq.write_table, []

    def failing(table, where, **kw):  # the second part file cannot be written: the run stops with one written
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(writer.pq, "write_table", failing)
    url_job = job(f"{bucket}/data/*", "url")
    assert main(["run", str(url_job), "--quiet"]) == 1
    assert len(by_id(tmp_path / "url")) == 2
    monkeypatch.setattr(writer.pq, "write_table", real)
    capsys.readouterr()
    assert main(["run", str(url_job), "--quiet"]) == 0
    got = {i: (r["text"], r["error"]) for i, r in by_id(tmp_path / "url").items()}  # by_id: each id once
    assert got.keys() == want.keys() and got["000.tar:a"] == want["000.tar:a"]
    assert got["rows.jsonl.gz:1"] == want["rows.jsonl.gz:1"]  # its image read from beside it, through fsspec
    assert "memory://" in got["rows.jsonl.gz:2"][1] and "img/none.png" in got["rows.jsonl.gz:2"][1]


def test_url_problems_are_one_line_naming_input_path(tmp_path, bucket, capsys):
    with fsspec.open(f"{bucket}/data/000.tar", "wb") as f:
        f.write(b"")
    cases = {"nosuch://bucket/x.tar": "fsspec has no filesystem for nosuch://",
             f"{bucket}/data/*.jsonl": "the pattern memory://",
             f"{bucket}/data/{{000..001}}.tar": "no such file or directory: memory://",
             f"{bucket}/other.tar": "no such file or directory"}
    for path, words in cases.items():
        with pytest.raises(JobError, match="^input.path: ") as e:
            job_for(tmp_path, path)
        assert words in str(e.value) and "\n" not in str(e.value)
    job = write_job(tmp_path / "job.yaml", {"model": "m", "prompt": "hi", "input": {"path": "nosuch://b/x.tar"},
                                            "output": {"path": str(tmp_path / "out")}})
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "input.path: " in err and "nosuch://" in err


def test_a_url_whose_fsspec_backend_is_missing_names_the_package_to_install(tmp_path):
    from fsspec.registry import known_implementations

    missing = [(protocol, spec["class"].split(".")[0]) for protocol, spec in known_implementations.items()
               if importlib.util.find_spec(spec["class"].split(".")[0]) is None]
    if not missing:
        pytest.skip("every fsspec backend is installed here")
    protocol, package = missing[0]
    with pytest.raises(JobError) as e:
        job_for(tmp_path, f"{protocol}://bucket/shards/{{000..009}}.tar")
    assert str(e.value).startswith(f"input.path: {protocol}:// URLs need the {package} package")
    assert f"pip install {package}" in str(e.value)


def test_brace_ranges_expand_for_local_paths_and_a_missing_member_is_refused(tmp_path):
    for i in (0, 1, 2):
        write_shard(tmp_path / f"s-{i:03d}.tar", [{"__key__": f"k{i}", "txt": b"t"}])
    job = job_for(tmp_path, tmp_path / "s-{000..001}.tar")
    assert [r.id for r in rows_of(job)] == ["s-000.tar:k0", "s-001.tar:k1"] and job.input.root == tmp_path
    assert [r.id for r in rows_of(job_for(tmp_path, tmp_path / "s-{002,000}.tar"))] == ["s-000.tar:k0", "s-002.tar:k2"]
    with pytest.raises(JobError, match="no such file or directory: .*s-003.tar"):
        job_for(tmp_path, tmp_path / "s-{001..003}.tar")


def test_a_gzipped_shard_reads_as_the_tar_and_a_cut_short_one_ends_in_one_error_row(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "gz").mkdir()
    shard = write_shard(tmp_path / "plain" / "000.tar", [{"__key__": f"k{i}", "png": png_bytes(i), "txt": b"x"}
                                                         for i in range(20)])
    for name in ("000.tar.gz", "000.tgz"):
        (tmp_path / "gz" / name).write_bytes(gzip.compress(shard.read_bytes()))
    want = [(r.id.split(":")[1], r.data) for r in rows_of(job_for(tmp_path, shard))]
    for name in ("000.tar.gz", "000.tgz"):
        job = job_for(tmp_path, tmp_path / "gz" / name)
        assert [(r.id.split(":")[1], r.data) for r in rows_of(job)] == want
        assert rows_of(job)[0].id == f"{name}:k0" and count_rows(job.input.files) == 20
    cut = tmp_path / "cut.tar.gz"
    packed = gzip.compress(shard.read_bytes())
    cut.write_bytes(packed[: len(packed) // 2])
    job = job_for(tmp_path, cut)
    rows = rows_of(job)
    assert all(r.error is None for r in rows[:-1]) and 3 < len(rows) < 20
    assert "the rest of cut.tar.gz cannot be read" in rows[-1].error and count_rows(job.input.files) == len(rows)
