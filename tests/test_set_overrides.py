"""`--set KEY=VALUE`: a string setting takes the text verbatim; any other setting reads it as YAML."""

from __future__ import annotations

import pytest

from batchvl.config import JobError, load_job
from batchvl.config.load import override_value
from batchvl.tools.bench import parse_settings

from .conftest import write_job, write_jsonl


@pytest.fixture
def job_file(tmp_path):
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hi"}])
    return write_job(tmp_path / "job.yaml", {"model": "m", "input": {"path": str(inp), "prompt_column": "prompt"},
                                            "output": {"path": str(tmp_path / "out")}})


@pytest.mark.parametrize("text", ["Caption #1 of {file}", "Describe: this", "say \"hi\" and 'bye'", "{a}: [b] #c",
                                  "- item", "  padded  ", "true", "12", "[x, y]"])
def test_a_string_setting_takes_the_text_verbatim(job_file, text):
    job = load_job(job_file, [f"prompt={text}", f"input.id_column={text}"])
    assert job.prompt == text and job.input.id_column == text


def test_null_words_unset_an_optional_string_setting(job_file):
    job = load_job(job_file, ["prompt=Hi", "input.prompt_column=null"])
    assert job.input.prompt_column is None and job.prompt == "Hi"
    assert override_value("prompt", "~") is None
    assert override_value("model", "null") == "null"  # not optional: verbatim


@pytest.mark.parametrize("key,text,value", [
    ("output.keep_columns", "[a, 'b: c', \"#d\"]", ["a", "b: c", "#d"]),
    ("generation.stop", "['#', 'x: y']", ["#", "x: y"]),
    ("generation.max_new_tokens", "64  # a comment", 64),
    ("generation.temperature", "0.5", 0.5),
    ("engine.gpus", "[0, 1]", [0, 1]),
    ("engine.gpus", "auto", "auto"),
    ("engine.compile", "false", False),
    ("generation.seed", "{a: 1}", {"a": 1}),  # YAML; the type check then names the key
])
def test_other_settings_read_the_text_as_yaml(key, text, value):
    assert override_value(key, text) == value


def test_a_mistyped_non_string_value_names_its_key(job_file):
    with pytest.raises(JobError, match="^generation.max_new_tokens: expected an integer"):
        load_job(job_file, ["generation.max_new_tokens=a: b"])


def test_bench_settings_read_values_as_set_does():
    settings = parse_settings(["compile=false", "media.prepare_threads=8", "backend=a: b #c"])  # plain: engine keys
    assert settings == {"engine": {"compile": False, "backend": "a: b #c"}, "media": {"prepare_threads": 8}}
