"""Row ids: default ids named relative to what input.path names, folders whose ids would move, and the id column's
values as text."""

from __future__ import annotations

import datetime
import decimal
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchvl.cli import main
from batchvl.config.load import job_from_mapping
from batchvl.io.ids import Ids, id_text, id_type_problem, moved_folder
from batchvl.io.readers import read_rows
from batchvl.run.output import pending_rows

from .conftest import base_job, write_job, write_jsonl


def names_for(tmp_path: Path, input_path: str) -> list[str]:
    job = job_from_mapping({"model": "m", "prompt": "p", "input": {"path": input_path}, "output": {"path": "out"}},
                           tmp_path)
    return [row.id for _, row in read_rows(job.input.files, Ids.of(job))]


def test_default_ids_name_files_relative_to_what_input_path_names(tmp_path):
    data = tmp_path / "data"
    (data / "x").mkdir(parents=True)
    write_jsonl(data / "x" / "a.jsonl", [{"p": 1}, {"p": 2}])
    # one file in one subfolder: still named by its path below the folder input.path names
    assert names_for(tmp_path, "data") == ["x/a.jsonl:1", "x/a.jsonl:2"]
    (data / "y").mkdir()
    pq.write_table(pa.table({"p": [3]}), data / "y" / "b.parquet")
    (data / "c.jsonl").write_text('{"p": 4}\n')
    everything = ["c.jsonl:1", "x/a.jsonl:1", "x/a.jsonl:2", "y/b.parquet:0"]
    assert names_for(tmp_path, "data") == everything  # the old ids did not move
    assert names_for(tmp_path, str(data)) == everything  # absolute or relative to the job file alike
    assert names_for(tmp_path, "data/**/*.*") == everything
    assert names_for(tmp_path, "data/*/a.jsonl") == ["x/a.jsonl:1", "x/a.jsonl:2"]  # below `data`, the glob's folder
    assert names_for(tmp_path, "data/x/*.jsonl") == ["a.jsonl:1", "a.jsonl:2"]
    assert names_for(tmp_path, "data/x/a.jsonl") == ["a.jsonl:1", "a.jsonl:2"]  # a file: its name


def test_moved_folder_finds_ids_relative_to_another_folder_and_nothing_else():
    root = Path("/in/data")
    names = ["x/a.jsonl", "y/b.parquet"]
    # written when data held only x/a.jsonl (an older batchvl), or with input.path data/x
    assert moved_folder({"a.jsonl:1", "a.jsonl:2"}, names, root) == ("a.jsonl", "x/a.jsonl", Path("/in/data/x"))
    assert moved_folder({"k#dup@a.jsonl:3"}, names, root) == ("a.jsonl", "x/a.jsonl", Path("/in/data/x"))
    # written with input.path /in, now /in/data
    assert moved_folder({"data/x/a.jsonl:5"}, names, root) == ("data/x/a.jsonl", "x/a.jsonl", Path("/in"))
    # nothing moved: ids of these files, of a file since removed, of the id column, duplicates of them
    fine = {"x/a.jsonl:1", "y/b.parquet:0", "gone.jsonl:1", "z/a.jsonl:1", "k7", "a.jsonl", "a.jsonl:x",
            "k#dup@x/a.jsonl:2"}
    assert moved_folder(fine, names, root) is None
    # an extra folder that is not the end of the root is a removed file, not a move
    assert moved_folder({"other/x/a.jsonl:1"}, names, root) is None


def test_a_file_added_to_the_input_folder_runs_no_row_twice(tiny_model, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "x").mkdir(parents=True)
    write_jsonl(data / "x" / "a.jsonl", [{"prompt": f"row {i}"} for i in range(3)])
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, data, tmp_path / "out",
                                                    generation={"max_new_tokens": 2},
                                                    input={"id_column": None, "image_column": None}))
    assert main(["run", str(job), "--quiet"]) == 0
    (data / "y").mkdir()
    write_jsonl(data / "y" / "b.jsonl", [{"prompt": "new"}])
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 0
    assert "1 rows ok, 0 failed, 3 already done" in capsys.readouterr().out
    ids = [r["id"] for r in pq.read_table(tmp_path / "out").to_pylist()]
    assert sorted(ids) == ["x/a.jsonl:1", "x/a.jsonl:2", "x/a.jsonl:3", "y/b.jsonl:1"]
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "4 rows in" in capsys.readouterr().out


def test_a_folder_whose_ids_would_move_is_refused_with_the_input_path_that_resumes_it(tiny_model, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "x").mkdir(parents=True)
    write_jsonl(data / "x" / "a.jsonl", [{"prompt": f"row {i}"} for i in range(2)])
    # what an older batchvl wrote for input.path `data` while data held x/a.jsonl alone: ids `a.jsonl:N`
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, data / "x", tmp_path / "out",
                                                    generation={"max_new_tokens": 2},
                                                    input={"id_column": None, "image_column": None}))
    assert main(["run", str(job), "--quiet"]) == 0
    fingerprint = (tmp_path / "out" / "_batchvl.json").read_text()
    write_jsonl(data / "y.jsonl", [{"prompt": "new"}])
    capsys.readouterr()
    for command in ("validate", "run"):
        assert main([command, str(job), "--set", f"input.path={data}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "holds ids that name input files relative to" in err and "('a.jsonl' for what is now 'x/a.jsonl')" in err
        assert f"set input.path: {data / 'x'}," in err  # input.path was given absolute, so is the answer
    assert main(["run", str(job), "--set", "input.path=data"]) == 2
    assert "set input.path: data/x," in capsys.readouterr().err  # relative to the job file, as it was given
    assert sorted(r["id"] for r in pq.read_table(tmp_path / "out").to_pylist()) == ["a.jsonl:1", "a.jsonl:2"]
    assert (tmp_path / "out" / "_batchvl.json").read_text() == fingerprint  # nothing was written
    assert main(["run", str(job), "--quiet", "--set", "input.path=data/x"]) == 0
    assert "0 rows ok, 0 failed, 2 already done" in capsys.readouterr().out


WHAT_IDS_ARE = "an id is a string, an integer or UTF-8 bytes"


@pytest.mark.parametrize("value, text", [
    ("a", "a"), ("", ""), ("lone\ud800", "lone\\ud800"), (7, "7"), (-3, "-3"), (2**70, "1180591620717411303424"),
    (b"k\xc3\xa9", "k\u00e9"), (bytearray(b"x"), "x"),
])
def test_strings_integers_and_utf8_bytes_are_ids(value, text):
    assert id_text(value) == text


@pytest.mark.parametrize("value, words", [
    (1.5, "a float (1.5)"), (1.0, "a float (1.0)"), (float("nan"), "a float (nan)"), (True, "a boolean (True)"),
    ([1, 2], "a list ([1, 2])"), ({"k": 1}, "an object ({'k': 1})"), (datetime.date(2024, 5, 1), "a date ("),
    (decimal.Decimal("1.50"), "a Decimal (Decimal('1.50'))"),
    (b"\xff\x00", "bytes that are not UTF-8 text (b'\\xff\\x00': byte 0 is invalid)"),
])
def test_any_other_value_is_refused_saying_what_it_is(value, words):
    with pytest.raises(ValueError) as e:
        id_text(value)
    assert str(e.value).startswith(words) and str(e.value).endswith(WHAT_IDS_ARE)


def pending(files: list[Path], root: Path) -> list[tuple[str, str | None]]:
    return [(row.id, row.error) for _, row in pending_rows(files, Ids(root, "id"), set())]


def test_jsonl_id_values_of_each_type(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n{"id": 1}\n{"id": "1"}\n{"id": 1.0}\n{"id": true}\n{"id": [1]}\n{"id": {"k": 1}}\n'
                    '{"id": null}\n{"x": 2}\n{"id": 12345678901234567890123}\n', encoding="utf-8")
    rows = pending([path], tmp_path)
    assert [i for i, _ in rows] == ["a", "1", "1#dup@rows.jsonl:3", *(f"rows.jsonl:{n}" for n in range(4, 10)),
                                    "12345678901234567890123"]
    errors = [e for _, e in rows]
    assert errors[:2] == [None, None] and errors[9] is None
    assert errors[2] == "input: duplicate id '1' (first at rows.jsonl:2)"  # the int 1 and the string "1" are one id
    for n, what in [(4, "a float (1.0)"), (5, "a boolean (True)"), (6, "a list ([1])"), (7, "an object ({'k': 1})")]:
        assert errors[n - 1] == f"input: record rows.jsonl:{n}: its 'id' value cannot be an id: {what}; {WHAT_IDS_ARE}"
    assert errors[7] == errors[8].replace(":9", ":8") == "input: record rows.jsonl:8 has no value in id column 'id'"


def test_parquet_id_columns_of_each_type(tmp_path):
    tables = {
        "a.parquet": pa.table({"id": pa.array(["s", "1"], pa.string())}),
        "b.parquet": pa.table({"id": pa.array([1, None, 9], pa.int64())}),  # 1: the string "1" of a.parquet
        "c.parquet": pa.table({"id": pa.array([2**64 - 1], pa.uint64())}),
        "d.parquet": pa.table({"id": pa.array([b"bin", b"\xff", "\u00e9".encode()], pa.binary())}),
        "e.parquet": pa.table({"id": pa.array(["big"], pa.large_string())}),
        "f.parquet": pa.table({"id": pa.array(["s", "dict"]).dictionary_encode()}),  # "s": a.parquet's again
    }
    for name, table in tables.items():
        pq.write_table(table, tmp_path / name)
    rows = pending([tmp_path / name for name in tables], tmp_path)
    assert rows == [
        ("s", None), ("1", None),
        ("1#dup@b.parquet:0", "input: duplicate id '1' (first at a.parquet:1)"),
        ("b.parquet:1", "input: record b.parquet:1 has no value in id column 'id'"), ("9", None),
        ("18446744073709551615", None),
        ("bin", None),
        ("d.parquet:1", "input: record d.parquet:1: its 'id' value cannot be an id: bytes that are not UTF-8 text "
                        f"(b'\\xff': byte 0 is invalid); {WHAT_IDS_ARE}"),
        ("\u00e9", None), ("big", None),
        ("s#dup@f.parquet:0", "input: duplicate id 's' (first at a.parquet:0)"), ("dict", None),
    ]


@pytest.mark.parametrize("type_, name", [
    (pa.float64(), "double"), (pa.float32(), "float"), (pa.bool_(), "bool"), (pa.timestamp("ms"), "timestamp[ms]"),
    (pa.date32(), "date32[day]"), (pa.decimal128(10, 2), "decimal128(10, 2)"),
    (pa.list_(pa.int64()), "list<item: int64>"),
    (pa.struct([("k", pa.int64())]), "struct<k: int64>"), (pa.dictionary(pa.int32(), pa.float64()), "double"),
])
def test_a_parquet_column_type_that_cannot_hold_ids_is_named(type_, name):
    assert id_type_problem(type_) == f"its values are {name}: {WHAT_IDS_ARE}"


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string(), pa.int8(), pa.uint64(), pa.binary(),
                                   pa.large_binary(), pa.binary(4), pa.null(), pa.dictionary(pa.int32(), pa.string())])
def test_a_parquet_column_type_that_holds_ids_passes(type_):
    assert id_type_problem(type_) is None


def test_a_float_parquet_id_column_is_refused_before_any_row(tiny_model, tmp_path, capsys):
    pq.write_table(pa.table({"id": [1.0, 2.0], "prompt": ["a", "b"]}), tmp_path / "t.parquet")
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, tmp_path / "t.parquet", tmp_path / "out",
                                                    input={"image_column": None}))
    for command in ("validate", "run"):
        assert main([command, str(job)]) == 2
        assert capsys.readouterr().err == ("batchvl: error: input.id_column: column 'id' of t.parquet cannot hold ids: "
                                           f"its values are double: {WHAT_IDS_ARE}; cast it to integers or strings\n")
    assert not (tmp_path / "out").exists()


def test_a_folder_written_before_the_id_rule_keeps_its_ids_and_runs_no_row_again(tiny_model, tmp_path, capsys):
    pq.write_table(pa.table({"id": [b"abc", b"\xff"], "prompt": ["a", "b"]}), tmp_path / "t.parquet")
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, tmp_path / "t.parquet", tmp_path / "out",
                                                    input={"image_column": None}, generation={"max_new_tokens": 2}))
    out = tmp_path / "out"
    assert main(["run", str(job), "--quiet"]) == 0
    (part,) = out.glob("part-*.parquet")
    table = pq.read_table(part)
    assert table.column("id").to_pylist() == ["abc", "t.parquet:1"]
    # what a batchvl before the rule wrote: str() of the bytes, both rows run
    pq.write_table(table.set_column(0, "id", pa.array(["b'abc'", "b'\\xff'"])), part)
    recorded = json.loads((out / "_batchvl.json").read_text())
    assert recorded["job"].pop("input.ids") == "text: str, int as decimal, bytes as UTF-8"
    (out / "_batchvl.json").write_text(json.dumps(recorded))
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 0
    assert "0 rows ok, 0 failed, 2 already done" in capsys.readouterr().out
    (out / "_batchvl.json").unlink()  # older still: part files and no fingerprint
    assert main(["run", str(job), "--quiet"]) == 0
    assert "0 rows ok, 0 failed, 2 already done" in capsys.readouterr().out
    assert "input.ids" not in json.loads((out / "_batchvl.json").read_text())["job"]  # still written before the rule
    assert sorted(pq.read_table(out).column("id").to_pylist()) == ["b'\\xff'", "b'abc'"]

    assert main(["run", str(job), "--quiet", "--overwrite"]) == 0
    assert sorted(pq.read_table(out).column("id").to_pylist()) == ["abc", "t.parquet:1"]
    assert "input.ids" in json.loads((out / "_batchvl.json").read_text())["job"]


def test_the_ray_prepare_stage_makes_a_users_ids_by_the_same_rule(tiny_model, tmp_path):
    from batchvl.run.ray_stages import Prepare

    path = write_jsonl(tmp_path / "rows.jsonl", [{"id": "x", "prompt": "p"}])
    prepare = Prepare(base_job(tiny_model, path, tmp_path / "out", input={"image_column": None}))
    table = prepare(pa.table({"id": pa.array([b"k", b"\xff", b"7"]), "prompt": ["a", "b", "c"]})).to_pylist()
    assert [r["id"] for r in table] == ["k", "<bad id>#1", "7"]
    assert [r["error"] for r in table] == [
        None, f"input: the row's 'id' value cannot be an id: bytes that are not UTF-8 text (b'\\xff': byte 0 is "
              f"invalid); {WHAT_IDS_ARE}", None]
