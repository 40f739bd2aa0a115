"""engine.quantization and engine.quantize_vision as job settings: what is refused, with one line naming the
setting and exit code 2 (a bad value, the transformers backend, the CPU, a GPU before compute capability 8.9, an
fp8 checkpoint run unquantized, a quantization the native engine does not load), and the fingerprint that keeps
fp8 and bf16 rows out of one output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from batchvl.cli import main
from batchvl.config import EngineSpec, JobError, job_from_mapping
from batchvl.engine.factory import check_quantization
from batchvl.io.writer import FINGERPRINT_NAME
from batchvl.models.checkpoint import CheckpointInfo
from batchvl.run.fingerprint import check_fingerprint, job_fingerprint

from .conftest import base_job, write_job, write_jsonl

NATIVE = ("engine.backend=native",)
ON_CPU = "engine.quantization: fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); " \
         "this run is on the CPU"


def job_dict(model: Path, tmp_path: Path) -> dict:
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hi", "image": None}])
    return base_job(model, rows, tmp_path / "out", chat_template="none")


def one_line_error(capsys, command: str, job: Path, *sets: str) -> str:
    """What `batchvl <command> job --set ...` prints: exit code 2, one line, no traceback."""
    code = main([command, str(job), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err.strip().removeprefix("batchvl: error: ")


CASES = {
    "a bad value": (("engine.quantization=int8",),
                    "engine.quantization: must be one of none, fp8; got 'int8'"),
    "the transformers backend": (("engine.quantization=fp8",),
                                 "engine.quantization: fp8 runs on the native backend only; engine.backend is "
                                 "transformers"),
    "the CPU": ((*NATIVE, "engine.quantization=fp8"), ON_CPU),
    "vision without fp8": ((*NATIVE, "engine.quantize_vision=true"),
                           "engine.quantize_vision: quantizes the vision tower with engine.quantization: fp8; "
                           "engine.quantization is none"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_one_line_naming_the_setting(capsys, tiny_model, tmp_path, command, case):
    sets, message = CASES[case]
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, tmp_path))
    assert one_line_error(capsys, command, job, *sets) == message
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="device auto is the CPU only where there is no GPU")
def test_device_auto_on_a_machine_without_a_gpu_is_the_cpu(capsys, tiny_model, tmp_path):
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, tmp_path))
    assert one_line_error(capsys, "validate", job, *NATIVE, "engine.device=auto", "engine.quantization=fp8") == ON_CPU


def test_an_fp8_checkpoint_is_not_run_unquantized(capsys, tiny_fp8_model, tmp_path):
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_fp8_model, tmp_path))
    for command in ("validate", "run"):
        assert one_line_error(capsys, command, job, *NATIVE) == (
            f"engine.quantization: {tiny_fp8_model.name} holds fp8 weights (compressed-tensors FP8_DYNAMIC); the "
            "native backend runs it only with engine.quantization: fp8")
    # with fp8 it gets as far as the device
    assert one_line_error(capsys, "validate", job, *NATIVE, "engine.quantization=fp8") == ON_CPU


@pytest.mark.parametrize("change, words", [
    (lambda q: q.update(quant_method="awq"), "quant_method 'awq' is not supported natively"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor"),
     "weights.strategy is 'tensor', not 'channel'; batchvl loads FP8_DYNAMIC only"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False),
     "input_activations.dynamic is False, not True"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8}), "a quantized KV cache (kv_cache_scheme) is not supported"),
    (lambda q: q.update(config_groups={"W8A16": ["Linear"]}), "the preset 'W8A16'; batchvl loads FP8_DYNAMIC only"),
])
def test_a_quantization_the_native_engine_does_not_load_is_refused_at_validate(capsys, tiny_fp8_model, tmp_path,
                                                                                change, words):
    import shutil

    model = tmp_path / "ck"
    shutil.copytree(tiny_fp8_model, model)
    config = json.loads((model / "config.json").read_text())
    change(config["quantization_config"])
    (model / "config.json").write_text(json.dumps(config))
    job = write_job(tmp_path / "job.yaml", job_dict(model, tmp_path))
    err = one_line_error(capsys, "validate", job, *NATIVE, "engine.quantization=fp8")
    assert err.startswith(f"model: {model / 'config.json'}: quantization_config") and words in err, err
    # the preset form of the scheme the native engine does load
    config["quantization_config"]["config_groups"] = {"fp8_dynamic": ["Linear"]}
    config["quantization_config"].update(quant_method="compressed-tensors", kv_cache_scheme=None)
    (model / "config.json").write_text(json.dumps(config))
    assert one_line_error(capsys, "validate", job, *NATIVE, "engine.quantization=fp8") == ON_CPU


@pytest.mark.parametrize("capability, refused", [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)])
def test_fp8_needs_compute_capability_8_9(monkeypatch, tiny_model, capability, refused):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0) if i == 0 else capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA A100-SXM4-80GB")
    spec = EngineSpec(backend="native", device="cuda", quantization="fp8", gpus=[0, 1])
    ck = CheckpointInfo.read(tiny_model)
    if not refused:
        check_quantization(spec, ck)
        return
    with pytest.raises(JobError) as caught:
        check_quantization(spec, ck)
    assert str(caught.value) == (
        "engine.quantization: fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); GPU 1 "
        f"(NVIDIA A100-SXM4-80GB) is {capability[0]}.{capability[1]}")


# --- the fingerprint ------------------------------------------------------------------------------------------

def fingerprint(tmp_path: Path, model: Path, **engine) -> tuple:
    """(the job with these engine settings, its fingerprint); native on the CPU, which check_job allows (the
    device is checked where the model is planned)."""
    raw = job_dict(model, tmp_path)
    raw["engine"].update(backend="native", **engine)
    job = job_from_mapping(raw, tmp_path)
    return job, job_fingerprint(job, CheckpointInfo.read(model), None)


def record(job, fp: dict) -> None:
    job.output_dir.mkdir(parents=True, exist_ok=True)
    (job.output_dir / FINGERPRINT_NAME).write_text(json.dumps({"version": 1, "job": fp}))


def test_the_fingerprint_keeps_fp8_and_bf16_rows_apart(tiny_model, tmp_path):
    bf16, bf16_fp = fingerprint(tmp_path, tiny_model)
    fp8, fp8_fp = fingerprint(tmp_path, tiny_model, quantization="fp8")
    fp8_vision, fp8_vision_fp = fingerprint(tmp_path, tiny_model, quantization="fp8", quantize_vision=True)
    assert (bf16_fp["engine.quantization"], bf16_fp["engine.quantize_vision"]) == ("none", False)
    record(bf16, bf16_fp)
    check_fingerprint(bf16, bf16_fp)
    with pytest.raises(JobError, match=r"engine.quantization: 'none' -> 'fp8'\); to resume it as it was written, "
                                       r"run with --set engine.quantization=none "):
        check_fingerprint(fp8, fp8_fp)
    record(fp8, fp8_fp)
    with pytest.raises(JobError, match=r"engine.quantization: 'fp8' -> 'none'"):
        check_fingerprint(bf16, bf16_fp)
    with pytest.raises(JobError, match=r"quantize_vision: false -> true\); .*--set engine.quantize_vision=false"):
        check_fingerprint(fp8_vision, fp8_vision_fp)


def test_a_folder_written_before_the_setting_existed_counts_as_unquantized(tiny_model, tmp_path):
    bf16, bf16_fp = fingerprint(tmp_path, tiny_model)
    fp8, fp8_fp = fingerprint(tmp_path, tiny_model, quantization="fp8")
    old = {k: v for k, v in bf16_fp.items() if k not in ("engine.quantization", "engine.quantize_vision")}
    record(bf16, old)
    check_fingerprint(bf16, bf16_fp)  # it resumes as it always did
    with pytest.raises(JobError) as caught:
        check_fingerprint(fp8, fp8_fp)
    assert "(engine.quantization: 'none' (not recorded: the only value then) -> 'fp8')" in str(caught.value)
    assert "--set engine.quantization=none" in str(caught.value)
