"""engine.compile: the regionally compiled model computes what the eager one does (CPU, float32)."""

from __future__ import annotations

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from batchvl.engine.compile import compile_model
from batchvl.models.checkpoint import CheckpointInfo
from batchvl.models.decoder import KVCache
from batchvl.models.loader import load_model


def test_compiled_blocks_match_eager(tiny_model):
    torch._dynamo.reset()  # dynamo's caches and counters are per process: other tests' graphs must not count here
    counters.clear()
    ck = CheckpointInfo.read(tiny_model)
    cpu = torch.device("cpu")
    eager = load_model(ck, cpu, torch.float32).model
    compiled = load_model(ck, cpu, torch.float32).model
    compile_model(compiled)
    vit, layer = compiled.vision.vit, compiled.lm.layers[0]
    # The compiled regions and their phases: the vision embedding runs once per image batch; the vision block
    # too, once with exact GELU and once with the fused one (engine.fused_vision_gelu: a guarded attribute, so a
    # graph of its own); each decoder-layer half runs in prefill and in decode (whose sequence dim of 1 is
    # specialised, so a graph of its own).
    regions = {"vision embed": (vit.embed, 1), "vision block": (vit.blocks[0].forward, 2),
               "layer._qkv": (layer._qkv, 2), "layer._finish": (layer._finish, 2)}
    assert all(hasattr(fn, "_torchdynamo_orig_callable") for fn, _ in regions.values()), "not wrapped by torch.compile"
    gen = torch.Generator().manual_seed(0)
    spec = eager.lm.spec
    with torch.inference_mode():
        for tiles, fused in ((5, False), (3, False), (4, True)):  # a second shape needs no other graph
            for model in (compiled, eager):
                for b in model.vision.vit.blocks:
                    b.fused_gelu = fused  # the custom op (linear_gelu_tanh) inside a compiled region
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
    # Every region was compiled, once per phase at most, one graph shared by every layer (a layer's own graph,
    # or a recompile for the second batch's sizes, would add cache entries: the shapes are dynamic).
    graphs = {name: len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__))
              for name, (fn, _) in regions.items()}
    assert all(1 <= graphs[name] <= phases for name, (_, phases) in regions.items()), graphs
    most = sum(phases for _, phases in regions.values())  # 7
    assert len(regions) <= counters["stats"]["unique_graphs"] <= most, dict(counters["stats"])
