"""engine.load_format: dummy (random weights with no weight files, for benchmarks of models whose checkpoint does
not fit the disk) on both backends, the checkpoint skeleton `bench --no-save` writes, the big shapes' published
dimensions, and the weights' size arithmetic against the built model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from batchvl.cli import main
from batchvl.engine.base import GenerationParams
from batchvl.engine.hf import TransformersEngine
from batchvl.media.normalize import normalize_uint8
from batchvl.models.checkpoint import CheckpointInfo, checkpoint_chat_template, load_tokenizer
from batchvl.models.footprint import weight_bytes
from batchvl.models.fp8 import FP8_DTYPE, FP8_MAX, Fp8Linear, fp8_targets, to_fp8_modules
from batchvl.models.loader import InternVL, build_specs, load_model
from batchvl.tools.check_parity import sample_rows, write_skeleton
from batchvl.tools.shapes import SHAPES
from batchvl.tools.tiny import make_tiny_model

from .conftest import base_job, write_job, write_jsonl

CPU = torch.device("cpu")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
H200_BYTES = 141e9


@pytest.fixture(scope="module")
def skeleton(tmp_path_factory) -> Path:
    return write_skeleton("tiny", tmp_path_factory.mktemp("models") / "tiny-skeleton", shapes=SHAPES)


def job_file(tmp_path: Path, model: Path, name: str = "job.yaml", backend: str = "native", **engine) -> Path:
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": "hi", "image": None} for i in range(3)])
    job = base_job(model, rows, tmp_path / "out", chat_template="none",
                   engine=dict(backend=backend, compile=False, **engine))
    return write_job(tmp_path / name, job)


def run(capsys, job: Path) -> tuple[int, str]:
    code = main(["run", str(job)])
    return code, capsys.readouterr().err


def test_the_skeleton_holds_configs_and_tokenizer_but_no_weights(skeleton):
    names = {p.name for p in skeleton.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith(WEIGHT_SUFFIXES) or n.endswith(".index.json")]


@pytest.mark.parametrize("backend", ["native", "transformers"])
def test_a_job_runs_end_to_end_on_dummy_weights_with_no_weight_file(capsys, skeleton, tmp_path, backend):
    code, err = run(capsys, job_file(tmp_path, skeleton, backend=backend, load_format="dummy"))
    assert code == 0, err
    table = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["id"] for r in table) == ["r0", "r1", "r2"]
    assert all(r["error"] is None and r["output_tokens"] > 0 for r in table)


def test_without_dummy_a_checkpoint_without_weights_is_refused_in_one_line(capsys, skeleton, tmp_path):
    code, err = run(capsys, job_file(tmp_path, skeleton))
    assert code == 2 and len(err.splitlines()) == 1 and "no safetensors weights" in err, err


def test_a_folder_written_on_dummy_weights_does_not_resume_on_the_checkpoints(capsys, tiny_model, tmp_path):
    code, err = run(capsys, job_file(tmp_path, tiny_model, load_format="dummy"))
    assert code == 0, err
    code, err = run(capsys, job_file(tmp_path, tiny_model, name="auto.yaml"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "engine.load_format: 'dummy' -> 'auto'" in err and "--set engine.load_format=dummy" in err


def test_a_folder_without_the_key_counts_as_written_from_the_checkpoint(capsys, tiny_model, tmp_path):
    code, err = run(capsys, job_file(tmp_path, tiny_model))
    assert code == 0, err
    record = tmp_path / "out" / "_batchvl.json"
    data = json.loads(record.read_text())
    assert data["job"].pop("engine.load_format") == "auto"
    record.write_text(json.dumps(data))
    code, err = run(capsys, job_file(tmp_path, tiny_model, name="dummy.yaml", load_format="dummy"))
    assert code == 2 and "engine.load_format: 'auto' (not recorded: the only value then) -> 'dummy'" in err, err


def test_the_transformers_backend_takes_dummy_weights_but_still_refuses_fp8(capsys, skeleton, tmp_path):
    job = job_file(tmp_path, skeleton, backend="transformers", load_format="dummy")
    code = main(["validate", str(job)])
    assert code == 0, capsys.readouterr().err
    code = main(["validate", str(job), "--set", "engine.quantization=fp8"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == ("batchvl: error: engine.quantization: fp8 runs on the native backend only; "
                                         "engine.backend is transformers")


def test_dummy_on_the_transformers_backend_refuses_an_opengvlab_checkpoint_in_one_line(capsys, tmp_path):
    """OpenGVLab's model is its own remote code: its parameter names are not the ones the filling reads."""
    model = tmp_path / "opengvlab"
    make_tiny_model(model, layout="opengvlab")
    job = job_file(tmp_path, model, backend="transformers", load_format="dummy", trust_remote_code=True)
    code = main(["validate", str(job)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("batchvl: error: engine.load_format: dummy with the transformers backend needs a "
                          "transformers-layout checkpoint"), err


def transformers_engine(model: Path, load_format: str) -> TransformersEngine:
    tokenizer = load_tokenizer(model)
    params = GenerationParams(max_new_tokens=3, eos_token_ids=(tokenizer.eos_token_id,), ignore_eos=True)
    return TransformersEngine(CheckpointInfo.read(model), tokenizer, params, device="cpu", dtype="float32",
                              load_format=load_format)


def test_transformers_dummy_weights_are_seeded_spread_like_the_natives_with_the_checkpoints_buffers(tiny_model):
    """Two dummy loads give the same weights, none the checkpoint's, with the native side's spread (norms near 1);
    the buffers the modules compute (the rotary inv_freq) are those of the checkpoint loaded normally, and the
    model generates with finite logits, through its vision tower too."""
    a, b = transformers_engine(tiny_model, "dummy"), transformers_engine(tiny_model, "dummy")
    real = transformers_engine(tiny_model, "auto")
    pa, pb, preal = (dict(e.model.named_parameters()) for e in (a, b, real))
    assert pa.keys() == preal.keys()
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not any(torch.equal(pa[n], preal[n]) for n in pa if pa[n].numel() > 1)
    norms = [n for n in pa if n.endswith(("norm.weight", "layernorm_before.weight", "layernorm_after.weight"))]
    assert any("vision_tower" in n for n in norms) and any("multi_modal_projector" in n for n in norms)
    for name, p in pa.items():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
        mean = 1.0 if name in norms else 0.0
        assert abs(p.mean().item() - mean) < 0.02 and p.std().item() < 0.04, name
    buffers, real_buffers = dict(a.model.named_buffers()), dict(real.model.named_buffers())
    assert "model.language_model.rotary_emb.inv_freq" in buffers and buffers.keys() == real_buffers.keys()
    assert all(torch.equal(buffers[n], real_buffers[n]) for n in buffers)
    tokenizer = a.tokenizer
    rows = sample_rows(tokenizer, checkpoint_chat_template(tiny_model, tokenizer),
                       CheckpointInfo.read(tiny_model).tokens_per_tile)[-2:]  # an image, text only
    with torch.inference_mode():
        logits = a.model(input_ids=torch.tensor([rows[0].prompt_ids]),
                         pixel_values=normalize_uint8(rows[0].tiles, torch.float32)).logits  # [1, S, V]
    assert torch.isfinite(logits).all() and logits.std() > 0
    results = a.generate(rows)
    assert [r.error for r in results] == [None, None] and all(r.output_tokens == 3 for r in results)


def test_dummy_weights_are_seeded_filled_everywhere_and_not_the_checkpoints(tiny_model):
    ck = CheckpointInfo.read(tiny_model)
    a = dict(load_model(ck, CPU, torch.float32, load_format="dummy").model.named_parameters())
    b = dict(load_model(ck, CPU, torch.float32, load_format="dummy").model.named_parameters())
    real = dict(load_model(ck, CPU, torch.float32).model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], real[n]) for n in a if a[n].numel() > 1)
    for name, p in a.items():
        assert torch.isfinite(p).all(), name
        mean = 1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")) else 0.0
        assert abs(p.float().mean().item() - mean) < 0.02 and p.float().std().item() < 0.04, name


def test_dummy_with_fp8_builds_the_fp8_layers_directly(tiny_model):
    """Every fp8 layer is filled in fp8 with a positive scale per row, each row quantized on its own (its largest
    magnitude is e4m3's 448); the dense parameters stay in the model's dtype."""
    loaded = load_model(CheckpointInfo.read(tiny_model), CPU, torch.bfloat16, quantization="fp8", load_format="dummy")
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, Fp8Linear)}
    assert set(layers) == {f"lm.layers.{i}.{p}" for i in range(2) for p in ("qkv", "o", "gate_up", "down")}
    for name, layer in layers.items():
        assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.dtype == torch.float32
        assert (layer.weight_scale > 0).all() and torch.isfinite(layer.weight_scale).all(), name
        row_max = layer.weight.float().abs().amax(dim=1)
        assert torch.equal(row_max, torch.full_like(row_max, FP8_MAX)), name
        dense = layer.weight.float() * layer.weight_scale
        assert 0.015 < dense.std().item() < 0.025, name
    others = [p for n, p in loaded.model.named_parameters() if n.rsplit(".", 1)[0] not in layers]
    assert others and all(p.dtype == torch.bfloat16 for p in others)


# --- the big shapes -------------------------------------------------------------------------------------------

PUBLISHED = {  # hidden, layers, heads, kv heads, intermediate, vocab, rope_theta, positions, eps (see shapes.py)
    "internvl2-40b": (7168, 60, 56, 8, 20480, 64000, 5e6, 4096, 1e-5),
    "internvl-chat-v1-2": (7168, 60, 56, 8, 20480, 64000, 5e6, 4096, 1e-5),  # the same Yi-34B
    "internvl2-76b": (8192, 80, 64, 8, 28672, 128256, 5e5, 8192, 1e-5),
}


@pytest.mark.parametrize("shape", list(PUBLISHED))
def test_the_big_shapes_have_their_published_dimensions_and_load_as_llama(shape, tmp_path):
    vision, text = SHAPES[shape]
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "rope_theta", "max_position_embeddings", "rms_norm_eps")
    assert tuple(text[k] for k in keys) == PUBLISHED[shape]
    assert text["model_type"] == "llama" and text["tie_word_embeddings"] is False
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"],
            vision["intermediate_size"], vision["norm_type"], vision["use_qk_norm"], vision["attention_bias"]) == \
        (3200, 45, 25, 12800, "rms_norm", True, False)
    vs, ts, family = build_specs(CheckpointInfo.read(write_skeleton(shape, tmp_path / shape, shapes=SHAPES)))
    assert family == "llama" and (ts.hidden, ts.layers, ts.heads, ts.kv_heads, ts.head_dim, ts.vocab) == \
        (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], 8, 128, text["vocab_size"])
    assert ts.rope.theta == text["rope_theta"] and vs.layers_to_run == 45 and vs.qk_norm and vs.norm == "rms"


def test_the_internvl3_5_8b_shape_is_qwen3_8b_and_loads_as_qwen3(tmp_path):
    vs, ts, family = build_specs(CheckpointInfo.read(write_skeleton("internvl3_5-8b", tmp_path / "m", shapes=SHAPES)))
    assert family == "qwen3" and ts.qk_norm and not ts.qkv_bias and not ts.tie_embeddings
    assert (ts.hidden, ts.layers, ts.heads, ts.kv_heads, ts.head_dim, ts.intermediate, ts.vocab, ts.rope.theta) == \
        (4096, 36, 32, 8, 128, 12288, 151936, 1e6)
    assert (vs.hidden, vs.layers_to_run, vs.qk_norm, vs.norm) == (1024, 24, False, "layer")  # InternViT-300M


@pytest.mark.parametrize("shape", ["tiny", "internvl2-4b", "internvl2-40b", "internvl2-76b", "internvl3_5-8b"])
@pytest.mark.parametrize("fp8", [(False, False), (True, False), (True, True)], ids=["bf16", "fp8 lm", "fp8 both"])
def test_the_weight_bytes_are_those_of_the_built_model(shape, fp8, tmp_path):
    vs, ts, _ = build_specs(CheckpointInfo.read(write_skeleton(shape, tmp_path / shape, shapes=SHAPES)))
    with torch.device("meta"):
        model = InternVL(vs, ts).to(torch.bfloat16)
    if fp8[0]:
        to_fp8_modules(model, fp8_targets(model, fp8[1]))
    built = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(vs, ts, 2, *fp8)["total"] == built


def test_the_76b_fits_one_h200_only_with_fp8(tmp_path):
    vs, ts, _ = build_specs(CheckpointInfo.read(write_skeleton("internvl2-76b", tmp_path / "m", shapes=SHAPES)))
    bf16, fp8 = weight_bytes(vs, ts), weight_bytes(vs, ts, fp8_lm=True)
    assert 150e9 < bf16["total"] < 155e9 and bf16["total"] > H200_BYTES
    assert 68e9 < fp8["lm linears"] < 70e9 and 10e9 < fp8["vision linears"] + fp8["vision other"] < 12e9
    assert fp8["total"] < 0.6 * H200_BYTES


def test_bench_no_save_runs_the_transformers_baseline_on_dummy_weights_too(capsys):
    from batchvl.tools.bench import bench

    sides, _ = bench("tiny", "caption-7tile", rows=1, batch=1, baseline="transformers", baseline_rows=1,
                     baseline_batch=1, device="cpu", no_save=True)
    native, reference = sides
    assert "setup (configs + 1 JPEGs)" in capsys.readouterr().out  # no weights were written
    assert (native.name, reference.name) == ("native", "transformers")
    assert (native.rows, reference.rows) == (1, 1) and reference.output_tokens == 128  # ignore_eos: all 128
