"""The vision tower's two forms of our own (batchvl.models.internvit): the patch embedding as a matrix product is
the reference's convolution, and `engine.fused_vision_gelu` is GELU's tanh approximation, in 16-bit dtypes only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchvl.config import job_from_mapping
from batchvl.engine.base import GenerationParams
from batchvl.engine.native import NativeEngine
from batchvl.models.checkpoint import CheckpointInfo
from batchvl.models.internvit import VisionBlock, VisionSpec, patchify
from batchvl.models.layers import linear_gelu_tanh
from batchvl.models.loader import load_model
from batchvl.run.fingerprint import job_fingerprint

from .conftest import base_job, write_jsonl

CPU = torch.device("cpu")


@pytest.mark.parametrize("size,patch", [(448, 14), (448, 56), (28, 7)])
def test_the_patch_embedding_is_the_convolution(size, patch):
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, size, size, generator=gen, dtype=torch.float64)
    conv = torch.nn.Conv2d(3, 32, kernel_size=patch, stride=patch, dtype=torch.float64)
    want = conv(pixels).flatten(2).transpose(1, 2)  # [T, grid^2, C], as InternViT's reference flattens it
    got = F.linear(patchify(pixels, patch), conv.weight.reshape(32, -1), conv.bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_tiny_towers_embedding_equals_the_convolution_it_loads(tiny_model):
    vit = load_model(CheckpointInfo.read(tiny_model), CPU, torch.float32).model.vision.vit
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        conv = vit.patch_embed(pixels).flatten(2).transpose(1, 2)
        want = torch.cat([vit.cls_token.expand(2, -1, -1), conv], dim=1) + vit.pos_embed
        torch.testing.assert_close(vit.embed(pixels), want, rtol=1e-4, atol=1e-4)  # float32 sums of 9,408 terms


def test_the_fused_mlp_is_the_tanh_approximation_and_the_default_is_exact():
    torch.manual_seed(0)
    block = VisionBlock(VisionSpec(hidden=64, layers=1, heads=4, intermediate=128, image_size=28, patch_size=14))
    x = torch.randn(2, 5, 64)
    h = block.norm2(x)
    exact, tanh = (block.fc2(F.gelu(block.fc1(h), approximate=a)) for a in ("none", "tanh"))
    with torch.inference_mode():
        torch.testing.assert_close(block._fc1_gelu(h), F.gelu(block.fc1(h)))
        block.fused_gelu = True
        torch.testing.assert_close(block.fc2(block._fc1_gelu(h)), tanh)
        torch.testing.assert_close(linear_gelu_tanh(h, block.fc1.weight, block.fc1.bias),
                                   F.gelu(block.fc1(h), approximate="tanh"))
    assert not torch.allclose(exact, tanh, rtol=0, atol=1e-7)  # the test tells the two apart


@pytest.mark.parametrize("dtype,fused", [("bfloat16", True), ("float32", False)])
def test_the_engine_fuses_gelu_in_16_bit_dtypes_only(tiny_rows, dtype, fused):
    ck, tokenizer, rows = tiny_rows
    params = GenerationParams(max_new_tokens=2, eos_token_ids=(tokenizer.eos_token_id,))
    engine = NativeEngine(ck, tokenizer, params, device="cpu", dtype=dtype)  # fused_vision_gelu on by default
    try:
        assert [b.fused_gelu for b in engine.model.vision.vit.blocks] == [fused] * len(engine.model.vision.vit.blocks)
        assert all(r.error is None for r in engine.generate(rows[:2]))
    finally:
        engine.close()


def test_the_setting_is_not_in_the_fingerprint(tiny_model, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hi", "image": None}])

    def job(**engine):
        raw = base_job(tiny_model, rows, tmp_path / "out", chat_template="none")
        raw["engine"].update(**engine)
        return job_from_mapping(raw, tmp_path)

    fused, exact = job(backend="native"), job(backend="native", fused_vision_gelu=False)
    ck = CheckpointInfo.read(tiny_model)
    assert job_fingerprint(fused, ck, None) == job_fingerprint(exact, ck, None)  # rounding, as engine.compile


@pytest.mark.parametrize("tiles,min_tiles,passes", [(9, 2, [4, 4, 2]), (9, 1, [4, 4, 1]), (10, 2, [4, 4, 2]),
                                                    (1, 2, [2]), (3, 2, [3]), (9, 4, [4, 4, 4]), (3, 4, [4])])
def test_a_last_chunk_of_one_tile_is_padded_to_two_for_a_compiled_tower(tiles, min_tiles, passes):
    """min_tiles 2: a compiled tower; min_tiles = chunk (4 here): the deterministic mode, one shape for every pass."""
    from batchvl.core import Request
    from batchvl.engine.vision import VisionRunner

    seen = []

    def run(chunk):  # [t, S, S, 3] uint8 -> [t, 2, 3]: each tile's own features, whatever shares its pass
        seen.append(chunk.shape[0])
        return chunk[:, :2, 0, :].float()

    pixels = torch.randint(0, 255, (tiles, 5, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = tiles - tiles // 2
    rows = [Request("a", [1], pixels[:split], [split]), Request("b", [1], pixels[split:], [tiles - split])]
    rows = [r for r in rows if r.tiles.shape[0]]
    got = VisionRunner(run, CPU, chunk=4, cuda_graphs=False, min_tiles=min_tiles).compute(rows)
    assert seen == passes  # torch.compile would meet a dimension of size 1 only where min_tiles allows it
    torch.testing.assert_close(got, pixels[:, :2, 0, :].float().flatten(0, 1), rtol=0, atol=0)
