"""How the native engine shares the device's memory, and that it gives all of it back.

The memory plan is pure arithmetic on the shapes, so it is tested here with the real shapes' numbers; the two
H200 failures it answers are in batchvl/engine/memory.py and NativeEngine.close.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from batchvl.engine.base import GenerationParams
from batchvl.engine.compile import compile_model
from batchvl.engine.memory import CACHE_SHARE, MIN_PREFILL_TOKENS, activation_bytes_per_token, plan_memory
from batchvl.engine.native import NativeEngine
from batchvl.models.checkpoint import CheckpointInfo, load_tokenizer
from batchvl.models.decoder import KVCache
from batchvl.models.loader import build_specs
from batchvl.tools.check_parity import write_skeleton
from batchvl.tools.shapes import SHAPES

GB = 10**9


def specs(shape, tmp_path):
    vision, text, _ = build_specs(CheckpointInfo.read(write_skeleton(shape, tmp_path / shape, shapes=SHAPES)))
    return vision, text


def test_a_76b_prefill_chunk_is_cut_to_what_the_weights_leave_and_the_whole_plan_fits(tmp_path):
    """On the H200 the 76B shape in fp8 left about 64 GB beside its weights; the old plan (60% to the cache,
    65,536-token prefill chunks) ran out of memory on a batch of 64 rows."""
    vision, text = specs("internvl2-76b", tmp_path)
    free = 64 * GB
    plan = plan_memory(free, text, vision, 2, prefill_tokens=65536, vision_chunk=64)
    per_token = activation_bytes_per_token(text.hidden, text.intermediate, text.q_width, text.kv_width, 2)
    assert 65536 * per_token > 16 * GB  # what one full chunk would hold: the old plan's 40% could not take it
    assert MIN_PREFILL_TOKENS <= plan.prefill_tokens < 65536 and plan.prefill_tokens % 1024 == 0
    assert plan.cache_bytes + plan.activation_bytes < 0.9 * free  # room left for the allocator's slack
    rows = plan.cache_bytes // KVCache.bytes_per_token(text, torch.bfloat16) // (1828 + 128)
    assert 32 <= rows < 64  # a batch of 64 caption-7tile rows is split in two, as it must be; 32 still fit


@pytest.mark.parametrize("shape", ["internvl2-1b", "internvl3-8b"])
def test_the_small_shapes_keep_the_cache_share_and_the_chunk_they_were_measured_with(shape, tmp_path):
    vision, text = specs(shape, tmp_path)
    for free in (60 * GB, 120 * GB):  # the H100's and the H200's memory beside these weights
        plan = plan_memory(free, text, vision, 2, prefill_tokens=65536, vision_chunk=64)
        assert plan.prefill_tokens == 65536 and plan.cache_bytes == int(free * CACHE_SHARE)


def test_a_device_too_small_for_the_activations_still_gets_the_smallest_chunk_and_no_negative_cache(tmp_path):
    vision, text = specs("internvl2-76b", tmp_path)
    plan = plan_memory(2 * GB, text, vision, 2, prefill_tokens=65536, vision_chunk=64)
    assert plan.prefill_tokens == MIN_PREFILL_TOKENS and plan.cache_bytes == 0


def test_closing_the_engine_frees_its_weights_even_when_compiled_blocks_hold_themselves(tiny_model):
    """A compiled block keeps its compiled forward on itself, a reference cycle that only the cycle collector
    frees; with it disabled here, only close() can free the weights. (On the H200 the 76B shape's second
    engine in one process ran out of memory with the first's weights still held.)"""
    tokenizer = load_tokenizer(tiny_model)
    engine = NativeEngine(CheckpointInfo.read(tiny_model), tokenizer,
                          GenerationParams(max_new_tokens=2, eos_token_ids=(tokenizer.eos_token_id,)),
                          device="cpu", dtype="float32")
    compile_model(engine.model)  # what the engine does on CUDA (it does not compile on the CPU)
    engine.compiled = True
    weight = weakref.ref(engine.model.lm.layers[0].input_norm.weight)
    gc.disable()
    try:
        engine.close()
        assert weight() is None
    finally:
        gc.enable()
