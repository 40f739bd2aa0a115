"""Nothing a job file holds stops `validate` or `run` with a traceback, or exhausts the machine: alias bombs,
NaN, absurd sizes, more CPU workers than the machine can hold, and a broken template, config.json or weights
file are each one line naming the key, with exit code 2."""

from __future__ import annotations

import json
import multiprocessing
import re
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest

from batchvl.cli import main
from batchvl.config.checks import LIMITS
from batchvl.config.spec import SHOWN_CHARS, max_cpu_workers

from .conftest import base_job, write_job, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def job_file(tiny_model, tmp_path):
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hi", "image": None}])
    return write_job(tmp_path / "job.yaml", base_job(tiny_model, inp, tmp_path / "out"))


def one_line_error(capsys, job: Path, *sets: str, command: str = "validate") -> str:
    """The error `batchvl <command> job --set ...` prints: exit code 2, one line, no traceback."""
    args = [command, str(job)]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0].removeprefix("batchvl: error: ")


# --- YAML: aliases, nesting ------------------------------------------------------------------------------------

def billion_laughs() -> str:
    """The issue's bomb as the value of `prompt`: about 500 bytes whose aliases expand to 9^9 strings."""
    lines = ["  - &a [" + ", ".join(['"lol"'] * 9) + "]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"  - &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "prompt:\n" + "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once_in_little_memory(capsys, job_file):
    bomb = job_file.parent / "bomb.yaml"
    bomb.write_text(job_file.read_text() + billion_laughs())
    assert len(billion_laughs()) < 600
    tracemalloc.start()
    start = time.perf_counter()
    try:
        line = one_line_error(capsys, bomb)
        took = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert took < 2 and peak < 50 << 20, (took, peak)
    assert re.fullmatch(r"job: line \d+: YAML anchors and aliases are not allowed in a job file \(found &a\)", line)


def test_an_alias_in_a_set_value_is_refused(capsys, job_file):
    # a non-string setting: a string one (prompt) takes the text verbatim, where an alias is plain text
    line = one_line_error(capsys, job_file, "output.keep_columns=[&a [lol, lol], *a, *a]")
    assert line == "--set output.keep_columns: YAML anchors and aliases are not allowed in a job file (found &a)"


def test_deep_nesting_is_refused_not_a_recursion_error(capsys, job_file):
    deep = job_file.parent / "deep.yaml"
    deep.write_text(job_file.read_text() + "prompt: " + "[" * 5000 + "]" * 5000 + "\n")
    assert re.fullmatch(r"job: line \d+: nested more than 32 levels deep", one_line_error(capsys, deep))


@pytest.mark.parametrize("value,words", [
    ("9" * 5000, "job: not valid YAML: Exceeds the limit"),  # Python refuses to read it
    ("2020-13-45", "job: not valid YAML: month must be in 1..12"),  # a date YAML reads, Python refuses
])
def test_a_value_yaml_reads_but_python_refuses_is_a_yaml_error(capsys, job_file, value, words):
    bad = job_file.parent / "bad.yaml"
    bad.write_text(job_file.read_text() + f"prompt: {value}\n")
    assert one_line_error(capsys, bad).startswith(words)


# --- long values in messages ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override,start", [
    ("generation.seed=[" + ", ".join(["x" * 300] * 300) + "]", "generation.seed: expected an integer, got a list "
                                                                "['xxx"),
    ("generation.seed={" + ", ".join(f"k{i}: v" for i in range(500)) + "}",
     "generation.seed: expected an integer, got a mapping {'k0': 'v', "),
    ("input.id_column=" + "i" * 5000, "input.id_column: column 'iii"),  # a string setting: the text verbatim
    ("model=" + "a" * 5000, "model: no such checkpoint directory: aaa"),  # too long a name for the OS
    ("chat_template=" + "b" * 5000 + ".jinja", "chat_template: expected auto, none or a .jinja file; no such "),
    ("input.path=" + "c" * 5000 + ".jsonl", "input.path: no such file or directory: ccc"),
    ("engine.backend=" + "d" * 5000, "engine.backend: must be one of native, transformers; got 'ddd"),
    ("x" * 5000 + "=1", "xxx"),  # an unknown key
])
def test_a_long_value_is_cut_in_the_message(capsys, job_file, override, start):
    line = one_line_error(capsys, job_file, override)
    assert line.startswith(start), line
    assert len(line) < 2 * SHOWN_CHARS + 100 and "..." in line, line


def test_a_newline_in_a_value_keeps_the_message_on_one_line(capsys, job_file):
    line = one_line_error(capsys, job_file, "model=a\nb")  # a real newline, taken verbatim (a string setting)
    assert line == r"model: no such checkpoint directory: a\nb"


# --- NaN, infinities, 64 bits ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("generation.temperature", ".nan"),
    ("generation.top_p", ".inf"),
    ("generation.repetition_penalty", "-.inf"),
    ("media.http_timeout_s", ".NaN"),
    ("media.http_timeout_s", "1" + "0" * 400),  # an integer no float holds
])
def test_nan_and_infinity_are_refused_in_every_float_setting(capsys, job_file, key, value):
    line = one_line_error(capsys, job_file, f"{key}={value}")
    assert line.startswith(f"{key}: must be a finite number, got "), line


def test_an_integer_setting_must_fit_in_64_bits(capsys, job_file):
    assert one_line_error(capsys, job_file, f"generation.seed={2 ** 70}") == \
        f"generation.seed: {2 ** 70} does not fit in 64 bits"


# --- upper bounds --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(LIMITS))
def test_a_setting_past_its_limit_is_refused(capsys, job_file, key):
    past = LIMITS[key] + 1
    line = one_line_error(capsys, job_file, f"{key}={past}")
    assert line == f"{key}: must be <= {LIMITS[key]:,}, got {float(past) if key.endswith('_s') else past}"


def test_every_setting_at_its_limit_is_valid(capsys, job_file):
    sets = [f"{key}={limit}" for key, limit in LIMITS.items()] + ["generation.temperature=0.7"]  # n > 1 samples
    assert main(["validate", str(job_file), *[a for s in sets for a in ("--set", s)]]) == 0, capsys.readouterr().err


def test_the_readme_documents_each_limit():
    readme = (ROOT / "README.md").read_text()
    for key, limit in LIMITS.items():
        name = key.split(".")[1]
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{key}`")), None)
        assert row is not None, f"README: no row for {key} in the table of limits"
        assert f"{limit:,}" in row or f"{limit}" in row, (name, row)


def test_cpu_workers_beyond_the_machine_are_refused_before_any_starts(capsys, job_file):
    cap = max_cpu_workers()
    for command in ("validate", "run"):
        start = time.perf_counter()
        line = one_line_error(capsys, job_file, "engine.gpus=1000", command=command)
        assert time.perf_counter() - start < 2
        assert line.startswith(f"engine.gpus: 1000 CPU worker processes asked for (engine.device: cpu), but at "
                               f"most {cap} may run here"), line
        assert multiprocessing.active_children() == []
    assert main(["validate", str(job_file), "--set", f"engine.gpus={cap}"]) == 0


# --- the plan: what validate reads of the checkpoint ---------------------------------------------------------

@pytest.fixture
def broken_model(tiny_model, tmp_path):
    """A copy of the tiny checkpoint to break, and a job file that uses it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hi", "image": None}])
    write_job(tmp_path / "job.yaml", base_job(model, inp, tmp_path / "out"))
    return model



def test_max_new_tokens_beyond_the_context_is_refused_by_validate(capsys, job_file, tiny_model):
    context = json.loads((tiny_model / "config.json").read_text())["text_config"]["max_position_embeddings"]
    line = one_line_error(capsys, job_file, "generation.max_new_tokens=1000000000")
    assert line == (f"generation.max_new_tokens: must be <= {context - 1:,} (the model's context of {context:,} "
                    "positions, less one for the prompt), got 1,000,000,000")
    assert main(["validate", str(job_file), "--set", f"generation.max_new_tokens={context - 1}"]) == 0


# --- the chat template ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("source,words", [
    ("{% for m in messages %}{{ m.content }}", "has a syntax error at line 1: Unexpected end of template"),
    ("{{ messages | no_such_filter }}", "has a syntax error at line 1: No filter named 'no_such_filter'"),
    ("{{ raise_exception('no user turns here') }}", "fails on a one-turn user message (TemplateError: no user"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_broken_jinja_file_fails_validate_and_run(capsys, job_file, source, words, command):
    (job_file.parent / "chat.jinja").write_text(source)
    line = one_line_error(capsys, job_file, "chat_template=chat.jinja", command=command)
    assert line.startswith(f"chat_template: chat.jinja {words}"), line
    assert not (job_file.parent / "out").exists()


def test_a_broken_checkpoint_template_is_named_as_chat_template(capsys, broken_model):
    (broken_model / "chat_template.jinja").write_text("{% if messages %}{{ messages[0].content }}")
    config = json.loads((broken_model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (broken_model / "tokenizer_config.json").write_text(json.dumps(config))
    line = one_line_error(capsys, broken_model.parent / "job.yaml")
    assert line.startswith("chat_template: the checkpoint's template has a syntax error at line 1"), line


# --- the checkpoint's files ------------------------------------------------------------------------------------

def _config(model: Path, **changes) -> str:
    config = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        if "." in key:
            section, name = key.split(".")
            config[section][name] = value
        else:
            config[key] = value
    return json.dumps(config)


@pytest.mark.parametrize("file,text,words", [
    ("config.json", "{not json", "config.json is not valid JSON (Expecting property name"),
    ("config.json", "[1, 2]", "config.json: expected a JSON object, got list"),
    ("config.json", lambda m: _config(m, text_config=[1]), "config.json: text_config is not a mapping"),
    ("config.json", lambda m: _config(m, **{"vision_config.patch_size": 0}), "a config value batchvl cannot read "
                                                                             "(ZeroDivisionError"),
    ("config.json", lambda m: _config(m, **{"text_config.max_position_embeddings": "lots"}),
     "a config value batchvl cannot read (ValueError: invalid literal for int()"),
    ("config.json", "\xff", "config.json is not valid JSON"),
    ("preprocessor_config.json", "7", "preprocessor_config.json: expected a JSON object, got int"),
    ("generation_config.json", "", "generation_config.json is not valid JSON"),
    ("generation_config.json", '{"eos_token_id": "two"}', "generation_config.json: eos_token_id 'two' is not a "
                                                          "token id"),
    ("model.safetensors.index.json", "garbage", "model.safetensors.index.json is not valid JSON"),
    ("model.safetensors.index.json", '{"weight_map": [1]}', "weight_map is not a mapping of tensor names"),
    ("tokenizer_config.json", "[3]", "cannot load the tokenizer from"),
])
def test_a_garbage_checkpoint_file_is_one_line_naming_model(capsys, broken_model, file, text, words):
    (broken_model / file).write_text(text(broken_model) if callable(text) else text)
    line = one_line_error(capsys, broken_model.parent / "job.yaml")
    assert line.startswith("model: ") and words in line, line


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-1])


def _header_only(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:100])


def _garbage(f: Path) -> None:
    f.write_bytes(b"not a safetensors file" * 100)


@pytest.mark.parametrize("backend", ["native", "transformers"])
@pytest.mark.parametrize("damage,words", [
    (_truncate, "is not a readable safetensors file (Error while deserializing header: incomplete metadata"),
    (_header_only, "is not a readable safetensors file (Error while deserializing header"),
    (_garbage, "is not a readable safetensors file (Error while deserializing header"),
    (Path.unlink, "that the index names is missing from"),
])
def test_a_broken_weights_file_fails_validate(capsys, broken_model, backend, damage, words):
    shard = sorted(broken_model.glob("*.safetensors"))[-1]
    damage(shard)
    line = one_line_error(capsys, broken_model.parent / "job.yaml", f"engine.backend={backend}")
    assert line.startswith("model: ") and words in line, line


def test_a_tensor_the_index_misplaces_is_named(capsys, broken_model):
    index = json.loads((broken_model / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    (broken_model / "model.safetensors.index.json").write_text(json.dumps(index))
    line = one_line_error(capsys, broken_model.parent / "job.yaml")
    assert line == f"model: {files[1]} lacks 1 tensor(s) that the index puts there, e.g. {name!r}"
