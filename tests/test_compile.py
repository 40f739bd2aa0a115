"""engine.compile: the regionally compiled model computes what the eager one does (CPU, float32)."""

from __future__ import annotations

import torch

from batchvl.engine.compile import compile_model
from batchvl.models.checkpoint import CheckpointInfo
from batchvl.models.decoder import KVCache
from batchvl.models.loader import load_model


def test_compiled_blocks_match_eager(tiny_model):
    ck = CheckpointInfo.read(tiny_model)
    cpu = torch.device("cpu")
    eager = load_model(ck, cpu, torch.float32).model
    compiled = load_model(ck, cpu, torch.float32).model
    compile_model(compiled)
    gen = torch.Generator().manual_seed(0)
    spec = eager.lm.spec
    with torch.inference_mode():
        for tiles in (5, 3):  # a second shape must not need a different answer
            pixels = torch.randn(tiles, 3, 448, 448, generator=gen)
            torch.testing.assert_close(compiled.vision(pixels), eager.vision(pixels), rtol=1e-4, atol=1e-5)
        for rows, width in ((2, 30), (3, 17)):
            x = torch.randn(rows, width, spec.hidden, generator=gen)
            lengths = torch.tensor([width, width - 3, width][:rows])
            caches = [KVCache(spec, 4, 64, cpu, torch.float32) for _ in range(2)]
            torch.testing.assert_close(compiled.lm.prefill(x, lengths, caches[0]),
                                       eager.lm.prefill(x, lengths, caches[1]), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(caches[0].k, caches[1].k, rtol=1e-4, atol=1e-5)
            token = torch.randint(0, spec.vocab, (rows,), generator=gen)
            steps = [model.lm.decode(model.lm.embed(token)[:, None], lengths, cache, 64)
                     for model, cache in ((compiled, caches[0]), (eager, caches[1]))]
            torch.testing.assert_close(steps[0], steps[1], rtol=1e-4, atol=1e-5)
    # One compiled graph per region and phase, shared by every layer: the vision block, then prefill's and
    # decode's two halves of a decoder layer (dynamic shapes: no recompiles for new sizes).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 5
