"""Model pieces that parity runs do not isolate: pixel shuffle versions, the loader's checks."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchvl.cli import main
from batchvl.errors import CheckpointError
from batchvl.models.checkpoint import CheckpointInfo
from batchvl.models.internvit import pixel_shuffle
from batchvl.models.loader import build_specs, load_model
from batchvl.tools.tiny import make_tiny_model

from .conftest import base_job, write_job, write_jsonl


def reference_pixel_shuffle(x, scale_factor=0.5, ps_version="v2"):
    # Restated from InternVLChatModel.pixel_shuffle.
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_matches_internvl(version):
    x = torch.randn(3, 8, 8, 5)
    assert torch.equal(pixel_shuffle(x, 0.5, version), reference_pixel_shuffle(x, 0.5, version))
    assert not torch.equal(pixel_shuffle(x, 0.5, "v1"), pixel_shuffle(x, 0.5, "v2"))


@pytest.fixture
def opengvlab_model(tmp_path):
    path = tmp_path / "og"
    make_tiny_model(path, layout="opengvlab", llm="internlm2")
    return path


def test_a_missing_weight_is_named(opengvlab_model):
    index = json.loads((opengvlab_model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "language_model.model.layers.1.feed_forward.w3.weight"
    shard = opengvlab_model / index[name]
    weights = load_file(shard)
    del weights[name]
    save_file(weights, shard)
    with pytest.raises(CheckpointError, match=r"^model: 1 parameter\(s\) not \(fully\) loaded.*layers\.1\.gate_up"):
        load_model(CheckpointInfo.read(opengvlab_model), torch.device("cpu"), torch.float32)


def test_a_misshapen_weight_is_named(opengvlab_model):
    index = json.loads((opengvlab_model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "mlp1.1.weight"
    weights = load_file(opengvlab_model / index[name])
    weights[name] = weights[name][:, :10].contiguous()
    save_file(weights, opengvlab_model / index[name])
    with pytest.raises(CheckpointError, match="mlp1.1.weight: shape"):
        load_model(CheckpointInfo.read(opengvlab_model), torch.device("cpu"), torch.float32)


def test_weights_are_converted_to_the_dtype(opengvlab_model):
    loaded = load_model(CheckpointInfo.read(opengvlab_model), torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("archs, model_type, named", [
    (["MistralForCausalLM"], "mistral", "language model MistralForCausalLM / mistral is not supported natively; "),
    # InternVL3.5-30B-A3B / -241B-A28B and InternVL3.5-GPT-OSS-20B-A4B: out of scope, and said to be MoE
    (["Qwen3MoeForCausalLM"], "qwen3_moe", "language model Qwen3MoeForCausalLM / qwen3_moe is not supported "
                                           "natively (a mixture-of-experts model"),
    (["GptOssForCausalLM"], "gpt_oss", "language model GptOssForCausalLM / gpt_oss is not supported natively (a "
                                       "mixture-of-experts model"),
    (None, "qwen3_moe", "language model qwen3_moe is not supported natively (a mixture-of-experts model"),  # -HF
], ids=["mistral", "qwen3-moe", "gpt-oss", "hf-qwen3-moe"])
def test_unsupported_language_model_is_one_line_naming_it(archs, model_type, named, opengvlab_model, tiny_model,
                                                          tmp_path, capsys):
    if archs is None:  # a transformers-native checkpoint: its text_config has a model_type only
        model = shutil.copytree(tiny_model, tmp_path / "hf")
        config = json.loads((model / "config.json").read_text())
        config["text_config"]["model_type"] = model_type
    else:
        model = opengvlab_model
        config = json.loads((model / "config.json").read_text())
        config["llm_config"].update(architectures=archs, model_type=model_type)
    (model / "config.json").write_text(json.dumps(config))
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": 1, "prompt": "x"}])
    job = write_job(tmp_path / "job.yaml", base_job(model, rows, tmp_path / "out",
                                                    input={"image_column": None}, engine={"backend": "native"}))
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"model: {named}" in err and err.count("\n") == 1
    assert "Qwen3ForCausalLM" in err  # the supported architectures are listed
    if archs is None and "moe" in model_type:  # transformers could load it; batchvl refuses it there too
        write_job(job, base_job(model, rows, tmp_path / "out", input={"image_column": None}))
        assert main(["validate", str(job)]) == 2
        err = capsys.readouterr().err
        assert "model: language model qwen3_moe is a mixture-of-experts model" in err and err.count("\n") == 1


def test_qwen3_sliding_window_is_refused_naming_it(tmp_path):
    config = {"architectures": ["InternVLChatModel"], "llm_config": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 64, "hidden_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 128, "use_sliding_window": True},
        "vision_config": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                          "intermediate_size": 128, "image_size": 448, "patch_size": 56}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="^model: qwen3 language model: Qwen3 sliding-window attention"):
        build_specs(CheckpointInfo.read(tmp_path))


def test_opengvlab_layout_on_the_transformers_backend_needs_remote_code(opengvlab_model, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": 1, "prompt": "x"}])
    job = write_job(tmp_path / "job.yaml", base_job(opengvlab_model, rows, tmp_path / "out",
                                                    input={"image_column": None}))
    assert main(["validate", str(job)]) == 2
    assert "engine.trust_remote_code:" in capsys.readouterr().err


def test_opengvlab_checkpoint_without_chat_template_uses_its_named_template(opengvlab_model, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": 1, "prompt": "x"}])
    job = write_job(tmp_path / "job.yaml", base_job(opengvlab_model, rows, tmp_path / "out",
                                                    input={"image_column": None}, engine={"backend": "native"}))
    assert main(["validate", str(job)]) == 0
    assert "InternVL conversation template internlm2-chat" in capsys.readouterr().out


def test_check_parity_on_the_tiny_shape_agrees_exactly_in_float32():
    from batchvl.tools.check_parity import check_parity

    checks, info = check_parity("tiny", tokens=8, device="cpu", dtype="float32")
    assert info["dtype"] == "float32" and len(checks) == 4
    for c in checks:
        assert c.rel_err_native_vs_ref < 1e-5 and c.agree_prefix == 8, c


def test_check_parity_puts_the_default_engine_beside_the_settings_under_test():
    """With engine settings (fp8 on the GPU), the default native engine runs on the same rows, and its error
    against float32 and its agreement with the settings' tokens stand beside theirs."""
    from batchvl.tools.check_parity import check_parity, format_table

    checks, info = check_parity("tiny", tokens=6, device="cpu", dtype="float32",
                                engine={"decode_attention": "sdpa"})
    for c in checks:
        assert c.rel_err_default_vs_fp32 is not None and c.rel_err_default_vs_fp32 < 1e-5
        assert c.default_agree_prefix == 6, c
    table = format_table(checks, info)
    assert "native (default settings) vs fp32 | agree with default native (prefix) |" in table
    assert all(line.count("|") == 11 for line in table.splitlines()[1:])
    plain, _ = check_parity("tiny", tokens=2, device="cpu", dtype="float32")
    assert plain[0].rel_err_default_vs_fp32 is None  # no settings, no second run


def test_check_parity_cuts_depth_and_leaves_out_float32_where_its_weights_would_not_fit(monkeypatch):
    """A shape too large for the device (InternVL-Chat-V1-2's 40B: 80 GB in bf16, 160 GB in float32) is checked
    at its own widths with fewer layers (--layers), and against transformers in its own dtype only where float32
    would not fit; the float32 columns say so rather than hold numbers."""
    from batchvl.tools import check_parity as cp

    monkeypatch.setattr(cp, "_fp32_fits", lambda ck, device: False)
    checks, info = cp.check_parity("tiny", tokens=3, device="cpu", dtype="float32", layers=1)
    assert info["layers"] == {"vision": 1, "text": 1}
    assert all(c.rel_err_native_vs_ref < 1e-5 and c.rel_err_native_vs_fp32 is None for c in checks)
    table = cp.format_table(checks, info)
    assert table.startswith("shape tiny (layers: vision 1, text 1) on cpu")
    assert table.splitlines()[-1] == "float32 columns: not run: the weights in float32 do not fit the device"
    assert all(line.count("|") == 9 and "| - |" in line for line in table.splitlines()[3:-1])


def test_check_parity_refuses_a_misspelt_engine_key_naming_it(capsys):
    assert main(["check-parity", "--engine", "compiel=true"]) == 2
    err = capsys.readouterr().err
    assert "engine.compiel: unknown key" in err and err.count("\n") == 1
    assert main(["check-parity", "--engine", "decode_attention=torch"]) == 2  # a value is checked as a job's is
    err = capsys.readouterr().err
    assert err.startswith("batchvl: error: engine.decode_attention:") and err.count("\n") == 1


def test_bench_runs_both_sides_on_the_cpu(capsys, tmp_path, monkeypatch):
    from batchvl.run.loop import build_engine
    from batchvl.tools.bench import bench, format_sides, parse_settings, parse_variant

    assert parse_variant("x:compile=false,engine.max_batch_size=3,media.prepare_threads=2") == \
        ("x", {"engine": {"compile": False, "max_batch_size": 3}, "media": {"prepare_threads": 2}})
    # --set items are taken whole: a value may hold commas
    assert parse_settings(["output.keep_columns=[url,width]", "gpus=2"]) == \
        {"output": {"keep_columns": ["url", "width"]}, "engine": {"gpus": 2}}
    import batchvl.tools.bench as bench_module

    built = []  # one engine per side, warm-up and timed rows alike

    def build(job, plan):  # the native side's first batch stalls 4 s in its vision stage: the warm-up pays it
        engine = build_engine(job, plan)
        built.append(job)
        if len(built) > 1:
            return engine
        generate, calls = engine.generate, []

        def stalled(requests):
            if not calls:
                with engine.times.stage("vision"):
                    time.sleep(4)
            calls.append(len(requests))
            return generate(requests)

        engine.generate = stalled
        return engine

    monkeypatch.setattr(bench_module, "build_engine", build)
    sides, _ = bench("tiny", "caption-7tile", rows=4, batch=2, baseline="transformers", baseline_rows=2,
                     baseline_batch=2, device="cpu", variants=["one-row:max_batch_size=1"], warmup_rows=2,
                     texts_out=tmp_path / "texts.json")
    native, variant, reference = sides
    out = capsys.readouterr().out
    # the warm-up rows are written too, and compared: 2 + 4
    assert "variant one-row {'engine': {'max_batch_size': 1}}: 6/6 rows have the native side's text" in out
    assert "native: warm-up over 2 rows" in out and "transformers: warm-up over 2 rows" in out
    # the figures count the rows after the warm-up, in the same run on the same engine
    assert (native.rows, native.images, variant.rows, reference.rows) == (4, 4, 4, 2)
    assert "native-warmup" not in out
    warmup_s = float(re.search(r"native: warm-up over 2 rows took ([0-9.]+) s", out).group(1))
    assert warmup_s >= 4 > native.seconds and native.stages["vision"] < 4  # the stall is the warm-up's alone
    assert [job.engine.backend for job in built] == ["native", "native", "transformers"]
    assert native.output_tokens == 4 * 128 and native.flops > 0  # ignore_eos: every row runs to 128 tokens
    assert {"vision", "prefill", "decode", "media wait", "writing"} <= set(native.stages)
    assert "generate" in reference.stages
    assert native.calls == [2, 2] and variant.calls == [1, 1, 1, 1] and reference.calls == [2]  # timed calls' rows
    assert "| 2 (2) |" in format_sides(sides, 800.0) and "| 4 (1) |" in format_sides(sides, 800.0)
    # the timed engine calls' wall time holds their stages (the warm-up's 4 s stall is outside it); the close comes
    # after the last row
    for side in sides:
        inside = sum(side.stages.get(k, 0) for k in ("vision", "prefill", "decode", "generate"))
        assert inside <= side.engine_s < side.seconds - side.close_s and 0 < side.close_s < side.seconds
    assert native.engine_s < 4
    texts = json.loads((tmp_path / "texts.json").read_text())  # --texts: each native side's text by row id
    assert set(texts) == {"native", "one-row"} and len(texts["native"]) == 6 and texts["native"] == texts["one-row"]


def test_caption_natural_lengths_are_long_tailed_seeded_and_run_with_refill_on_and_off(capsys):
    import random

    from batchvl.cli import _parser
    from batchvl.tools.bench import bench
    from batchvl.tools.bench_data import WORKLOADS, natural_length

    lengths = [natural_length(r) for r in [random.Random(0)] for _ in range(2000)]
    body = sum(40 <= n <= 120 for n in lengths) / len(lengths)
    assert 0.85 < body < 0.95 and max(lengths) > 300 and min(lengths) >= 40 and max(lengths) <= 400
    assert lengths[:50] == [natural_length(r) for r in [random.Random(0)] for _ in range(50)]  # seeded
    choices = next(a for a in _parser()._subparsers._group_actions[0].choices["bench"]._actions
                   if a.dest == "workload").choices
    assert set(choices) == set(WORKLOADS)
    sides, _ = bench("tiny", "caption-natural", rows=4, batch=2, baseline=None, baseline_rows=0, baseline_batch=2,
                     device="cpu", variants=["refill:refill=true"])
    native, refill = sides
    assert native.output_tokens == refill.output_tokens > 4 * 40  # each row its own limit (ignore_eos)
    assert "variant refill {'engine': {'refill': True}}: 4/4 rows have the native side's text" in \
        capsys.readouterr().out
