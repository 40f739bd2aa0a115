"""`batchvl run --ray` and the batchvl.ray stages, on a local Ray cluster of 3 CPUs with the tiny model.

A Ray run must write what a local run writes, row for row and with the same Arrow schema, into an output
folder that `batchvl status`, resume and a later local run all understand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import batchvl
from batchvl.cli import main
from batchvl.io.writer import output_schema, part_files, read_done
from batchvl.run import progress

from .conftest import base_job, write_job, write_jsonl

REPO = Path(batchvl.__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    """One local Ray cluster for the module; its workers import this checkout's batchvl."""
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


def rows_by_id(out: Path) -> list[dict]:
    return sorted(pq.read_table(out).to_pylist(), key=lambda r: r["id"])


def parts_schema(out: Path) -> pa.Schema:
    (schema,) = {pq.read_schema(p).remove_metadata() for p in part_files(out)}
    return schema


def jsonl_rows(images: dict[str, Path]) -> list[dict]:
    pictures = ["wide.jpg", "tall.png", ["square.jpg", "tiny.png"], None]
    rows = [{"id": f"r{i}", "prompt": f"Describe picture {i}.", "image": pictures[i % 4],
             "meta": {"n": i, "tags": ["a"] * (i % 2)} if i % 3 else f"plain {i}"} for i in range(7)]
    rows.append({"id": "missing", "prompt": "Describe it.", "image": "nowhere.jpg", "meta": None})
    rows.append({"id": "r1", "prompt": "A second row with the id r1.", "image": None, "meta": 1.5})
    return rows


class RayStarted(Exception):
    pass


@contextmanager
def no_ray_work(monkeypatch):
    """Within: connecting to Ray, asking the cluster for its resources or reading a dataset raises RayStarted."""
    def started(*args, **kwargs):
        raise RayStarted

    with monkeypatch.context() as m:
        m.setattr(ray, "init", started)
        m.setattr(ray, "is_initialized", lambda: False)
        m.setattr(ray, "cluster_resources", started)
        m.setattr(ray.data, "read_datasource", started)
        yield


def test_ray_run_equals_a_local_run_row_for_row_and_a_rerun_adds_nothing(tiny_model, images, tmp_path, capfd,
                                                                                monkeypatch):
    media = images["wide.jpg"].parent
    inp = write_jsonl(media / "rows.jsonl", jsonl_rows(images))
    with open(inp, "a", encoding="utf-8") as f:
        f.write("{not json\n")  # a bad line: an error row in both runs
    sections = dict(output={"keep_columns": ["meta"]}, engine={"max_batch_size": 2})
    write_job(tmp_path / "local.yaml", base_job(tiny_model, inp, tmp_path / "local", **sections))
    write_job(tmp_path / "ray.yaml", base_job(tiny_model, inp, tmp_path / "ray", **sections))

    assert main(["run", str(tmp_path / "local.yaml"), "--quiet"]) == 0
    capfd.readouterr()
    monkeypatch.setattr(progress, "_is_terminal", lambda stream: True)  # the bar, not the log lines of a log file
    assert main(["run", str(tmp_path / "ray.yaml"), "--ray"]) == 0  # not --quiet: Ray's output is kept below batchvl's
    err = capfd.readouterr().err
    assert "10/10" in err  # batchvl's bar
    for ray_data_line in ("streaming_executor.py", "logging_progress.py", "Progress will be logged", "Progress bars"):
        assert ray_data_line not in err  # Ray Data's plan, its progress report and its notice that bars are off
    local, remote = rows_by_id(tmp_path / "local"), rows_by_id(tmp_path / "ray")
    assert remote == local
    assert len(local) == 10
    errors = {r["id"]: r["error"] for r in local if r["error"]}
    assert errors["missing"].startswith("media: no such file")
    assert errors["rows.jsonl:10"].startswith("input: line rows.jsonl:10 is not valid JSON")
    assert errors["r1#dup@rows.jsonl:9"] == "input: duplicate id 'r1' (first at rows.jsonl:2)"
    assert sum(r["error"] is None for r in local) == 7
    assert parts_schema(tmp_path / "ray") == parts_schema(tmp_path / "local") == output_schema({"meta": pa.string()})
    local_summary = json.loads((tmp_path / "local" / "_summary.json").read_text())
    ray_summary = json.loads((tmp_path / "ray" / "_summary.json").read_text())
    for key in ("state", "rows_ok", "rows_failed", "failed_by_kind", "rows_this_run"):
        assert ray_summary[key] == local_summary[key], key
    assert (tmp_path / "ray" / "_batchvl.json").read_text() == (tmp_path / "local" / "_batchvl.json").read_text()

    parts = part_files(tmp_path / "ray")
    capfd.readouterr()
    with no_ray_work(monkeypatch):
        assert main(["run", str(tmp_path / "ray.yaml"), "--quiet", "--ray"]) == 0  # a rerun: nothing left to do
    assert "0 rows ok, 0 failed, 10 already done" in capfd.readouterr().out
    assert part_files(tmp_path / "ray") == parts
    assert rows_by_id(tmp_path / "ray") == local
    assert main(["run", str(tmp_path / "ray.yaml"), "--quiet"]) == 0  # a local rerun reads the Ray parts
    assert "0 rows ok, 0 failed, 10 already done" in capfd.readouterr().out
    assert main(["status", str(tmp_path / "ray")]) == 0
    assert "10 rows" in capfd.readouterr().out


def test_ray_run_resumes_a_partial_output_and_reads_parquet_with_default_ids(tiny_model, images, tmp_path):
    media = images["wide.jpg"].parent
    table = pa.table({"prompt": [f"Picture {i}." for i in range(6)],
                      "image": ["wide.jpg", "tall.png", None, "square.jpg", "gone.png", "tiny.png"],
                      "score": pa.array(range(6), pa.int16())})
    pq.write_table(table, media / "rows.parquet", row_group_size=4)
    sections = dict(input={"id_column": None}, output={"keep_columns": ["score"]})
    write_job(tmp_path / "local.yaml", base_job(tiny_model, media / "rows.parquet", tmp_path / "local", **sections))
    write_job(tmp_path / "ray.yaml", base_job(tiny_model, media / "rows.parquet", tmp_path / "ray", **sections))
    assert main(["run", str(tmp_path / "local.yaml"), "--quiet"]) == 0
    local = rows_by_id(tmp_path / "local")

    # half the rows already written (by a local run's part file): the Ray run adds only the others
    (tmp_path / "ray").mkdir()
    pq.write_table(pa.Table.from_pylist(local[:3], schema=parts_schema(tmp_path / "local")),
                   tmp_path / "ray" / "part-earlier-00000.parquet")
    assert main(["run", str(tmp_path / "ray.yaml"), "--quiet", "--ray"]) == 0
    assert rows_by_id(tmp_path / "ray") == local
    assert [r["id"] for r in local] == [f"rows.parquet:{i}" for i in range(6)]
    assert local[4]["error"].startswith("media: no such file")
    assert parts_schema(tmp_path / "ray") == parts_schema(tmp_path / "local")
    assert parts_schema(tmp_path / "ray").field("score").type == pa.int16()
    ids, ok, failed, *_ = read_done(tmp_path / "ray")
    assert len(ids) == 6 and ok == 5 and failed == {"media": 1}


def test_a_rerun_with_ray_exits_before_starting_ray_only_when_every_input_row_is_written(tiny_model, tmp_path, capsys,
                                                                                          monkeypatch):
    """The finished folder comes from a local run (the same folder a Ray run writes), of a job with engine.device
    and dtype auto: the dtype its fingerprint records says whether the cluster that wrote it had GPUs."""
    rows = [{"id": "a", "prompt": "One."}, {"id": "b", "prompt": "Two."}, {"id": "a", "prompt": "Again."}]
    inp = write_jsonl(tmp_path / "rows.jsonl", rows)
    with open(inp, "a", encoding="utf-8") as f:
        f.write("{not json\n")  # an error row, which --retry-errors runs again
    job = str(write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out", input={"image_column": None},
                                                       engine={"device": "auto", "dtype": "auto"})))
    assert main(["run", job, "--quiet"]) == 0
    out = tmp_path / "out"
    fingerprint = json.loads((out / "_batchvl.json").read_text())
    assert len(read_done(out)[0]) == 4 and fingerprint["job"]["engine.dtype"] == "float32"
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    with no_ray_work(monkeypatch):
        assert main(["run", job, "--quiet", "--ray"]) == 0
        assert "0 rows ok, 0 failed, 4 already done" in capsys.readouterr().out
        assert main(["run", job, "--quiet", "--ray", "--set", "generation.max_new_tokens=5"]) == 2
        assert "was written with a different job (generation.max_new_tokens: 12 -> 5)" in capsys.readouterr().err
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # the folder is left as it was
        with pytest.raises(RayStarted):  # the bad line's error row is to run again
            main(["run", job, "--quiet", "--ray", "--retry-errors"])

        fingerprint["job"]["engine.dtype"] = "bfloat16"  # as a cluster with GPUs writes it
        (out / "_batchvl.json").write_text(json.dumps(fingerprint))
        assert main(["run", job, "--quiet", "--ray"]) == 0
        assert main(["run", job, "--quiet", "--ray", "--set", "engine.dtype=float32"]) == 2
        capsys.readouterr()

        write_jsonl(inp, [{"id": "a", "prompt": "One."}, {"id": "c", "prompt": "New."}, {"id": "a", "prompt": "x"}])
        with open(inp, "a", encoding="utf-8") as f:
            f.write("{not json\n")  # as many rows as ids in the folder, but "c" is not one of them
        with pytest.raises(RayStarted):
            main(["run", job, "--quiet", "--ray"])


def test_a_rerun_with_ray_runs_when_a_record_that_could_not_be_read_reads_now(tiny_model, tmp_path, monkeypatch):
    """Without an id column a fixed line keeps its id (its position), which the folder already holds as an error
    row: the early exit must still see that the run has work (replacing that row), as a local run does."""
    inp = tmp_path / "rows.jsonl"
    inp.write_text('{"prompt": "One."}\n{not json\n')
    job = str(write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out",
                                                       input={"image_column": None, "id_column": None})))
    assert main(["run", job, "--quiet"]) == 0
    with no_ray_work(monkeypatch):
        assert main(["run", job, "--quiet", "--ray"]) == 0  # finished: Ray is not started
        inp.write_text('{"prompt": "One."}\n{"prompt": "Two."}\n')
        with pytest.raises(RayStarted):
            main(["run", job, "--quiet", "--ray"])


def readme_pipeline() -> str:
    """The code of the README's 'In your own Ray pipeline' example."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### In your own Ray pipeline"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```\n", start)]


def test_readme_pipeline_runs_as_written_on_a_cluster_without_gpus_and_gives_the_local_rows(tiny_model, images,
                                                                                               tmp_path):
    """The README's example, run as it is written (its folder `shared` made this test's) on this module's cluster:
    3 CPUs and no GPU. Its rows are a local run's, except that a duplicate id is not marked: two rows."""
    media = images["wide.jpg"].parent
    rows = [{"id": f"u{i}", "prompt": f"Picture {i}.", "image": image}
            for i, image in enumerate(["wide.jpg", "tall.png", None, "missing.jpg", "tiny.png"])]
    rows.append({"id": "u0", "prompt": "The first picture again.", "image": None})
    pq.write_table(pa.Table.from_pylist(rows), media / "rows.parquet")
    write_job(media / "job.yaml", base_job(tiny_model, media / "rows.parquet", tmp_path / "local",
                                           engine={"device": "auto", "dtype": "auto"}))
    assert main(["run", str(media / "job.yaml"), "--quiet"]) == 0
    local = rows_by_id(tmp_path / "local")

    code = readme_pipeline()
    assert code.count('"/shared/captions"') == 1
    exec(compile(code.replace('"/shared/captions"', repr(str(media))), "README.md", "exec"), {})

    mine = rows_by_id(media / "out")
    assert pq.read_table(media / "out").schema.remove_metadata() == output_schema({})
    assert [r["id"] for r in mine] == ["u0", "u0", "u1", "u2", "u3", "u4"]
    assert [r for r in mine if r["id"] != "u0"] == [r for r in local if not r["id"].startswith("u0")]
    assert local[0]["id"] == "u0" and local[0] in mine and local[1]["id"] == "u0#dup@rows.parquet:5"
    assert {r["error"] is None for r in mine if r["id"] == "u0"} == {True}
    assert mine[4]["id"] == "u3" and mine[4]["error"].startswith("media: no such file")

def test_engine_refuses_rows_that_were_not_prepared(tiny_model, images, tmp_path):
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out", input={"image_column": None}))
    import batchvl.ray

    engine = batchvl.ray.Engine(str(tmp_path / "job.yaml"))
    with pytest.raises(ValueError, match="through Prepare first"):
        engine(pa.table({"id": ["a"], "prompt": ["x"]}))


def test_cuda_on_a_cluster_without_gpus_is_a_job_error(tiny_model, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out", input={"image_column": None}))
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet", "--ray", "--set", "engine.device=cuda"]) == 2
    assert capsys.readouterr().err.strip() == "batchvl: error: engine.device: cuda, but the Ray cluster has no GPUs"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given", ["flag", "RAY_ADDRESS"])
def test_a_ray_client_address_is_refused_in_one_line_before_the_output_folder_is_made(tiny_model, tmp_path, capsys,
                                                                                        monkeypatch, given):
    """Ray Data's executor cannot run through Ray Client (it dies in it, with ray[client] installed): refused."""
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out", input={"image_column": None}))
    argv = ["run", str(job), "--quiet", "--ray"]
    if given == "flag":
        argv.append("ray://head.example:10001")
    else:
        monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("batchvl: error: --ray")
    assert "ray://head.example:10001 is a Ray Client address" in err and "--ray auto" in err
    assert not (tmp_path / "out").exists()


def test_a_cluster_refusing_this_process_its_token_is_one_line_before_the_output_folder_is_made(
        tiny_model, tmp_path, capsys, monkeypatch):
    """What ray.init raises, after its retries, when a token-authenticated cluster is given by address without
    RAY_AUTH_MODE=token (the real refusal takes 20 s: `python -m batchvl.tools.ray_cluster_check` runs it)."""
    def refused(*args, **kwargs):
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: ray.exceptions.AuthenticationError: "
                               "RPC error: InvalidAuthToken: Authentication token is missing or incorrect.")
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from e

    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out", input={"image_column": None}))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    assert main(["run", str(job), "--quiet", "--ray", "10.0.0.1:6379"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("batchvl: error: --ray: the Ray cluster at 10.0.0.1:6379 refused")
    assert "RAY_AUTH_MODE=token" in err
    assert not (tmp_path / "out").exists()


def test_without_ray_batchvl_imports_and_run_ray_names_the_extra(tiny_model, tmp_path):
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out", input={"image_column": None}))
    code = ("import sys; sys.modules['ray'] = None\n"
            "import batchvl, batchvl.ray, batchvl.cli\n"
            f"sys.exit(batchvl.cli.main(['run', {str(job)!r}, '--quiet', '--ray']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("batchvl: error: --ray: Ray Data is not installed")
    assert out.stderr.strip().endswith("install it with: pip install 'batchvl[ray]'")


def test_prepare_reads_arrow_pandas_and_numpy_batches_alike(tiny_model, images, tmp_path):
    """Ray hands map_batches a batch in the format asked for; Prepare gives the same rows for each."""
    import numpy as np

    import batchvl.ray

    media = images["wide.jpg"].parent
    table = pa.table({"id": ["a", "b", "c"], "prompt": ["One.", "Two.", "Three."],
                      "image": ["wide.jpg", None, "missing.png"]})
    pq.write_table(table, media / "rows.parquet")
    write_job(tmp_path / "job.yaml", base_job(tiny_model, media / "rows.parquet", tmp_path / "out"))
    prepare = batchvl.ray.Prepare(str(tmp_path / "job.yaml"))
    arrow = prepare(table)
    assert arrow.schema == batchvl.ray.PREPARED_SCHEMA
    assert arrow.column("error").to_pylist()[:2] == [None, None]
    assert arrow.column("error")[2].as_py().startswith("media: no such file")
    assert len(arrow.column("tiles")[0].as_py()) == sum(arrow.column("tiles_per_image")[0].as_py()) * 448 * 448 * 3
    assert prepare(table.to_pandas()).equals(arrow)
    assert prepare({name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
                   ).equals(arrow)
