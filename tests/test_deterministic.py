"""engine.deterministic on the CPU: the tiny checkpoint's rows give bit-identical first-step logits and the same
tokens in batches of 1, 3 and 8, with the batch-invariant kernels interpreted (TRITON_INTERPRET=1, conftest);
and the job setting's checks and fingerprint.

One thread: torch's CPU elementwise kernels run the tail of each thread's share of a tensor in scalar code, whose
exp (SiLU, GELU) can round differently from the vector code, and where the shares end depends on the tensor's
size. The GPU runs one code path per element; the GPU proof is `bench --variant` with the mode on (issue 21).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from batchvl.config import EngineSpec, JobError
from batchvl.config.checks import check_engine
from batchvl.run.fingerprint import changed_keys


def test_rows_give_the_same_logits_and_tokens_in_batches_of_1_3_and_8(tiny_rows):
    """Text rows of three lengths, so that each batch pads them to another width. (The same check over the four
    sample rows with their images, vision chunks of 4 tiles, also passes, in 70 s of interpreted kernels: too
    slow for the suite.)"""
    from batchvl.engine.base import GenerationParams
    from batchvl.engine.native import NativeEngine

    ck, tokenizer, samples = tiny_rows
    text = samples[3]  # the text-only row
    rows = [dataclasses.replace(text, id=f"cut-{n}", prompt_ids=text.prompt_ids[:n]) for n in (9, 20, 33)]
    params = GenerationParams(max_new_tokens=2, eos_token_ids=(tokenizer.eos_token_id,), ignore_eos=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = NativeEngine(ck, tokenizer, params, device="cpu", dtype="float32", deterministic=True)
        assert engine.model.lm.prefill_attention is not None and not engine.compiled

        def run(batch: list[int]) -> tuple[torch.Tensor, list[list[int]]]:
            engine.first_step_logits = []
            results = engine.generate([rows[i] for i in batch])
            assert all(r.error is None for r in results)
            return torch.cat(engine.first_step_logits), engine.last_tokens

        eight, eight_tokens = run([0, 1, 2, 2, 1, 0, 1, 2])
        for batch in ([1], [2, 0, 1]):
            logits, tokens = run(batch)
            for at, i in enumerate(batch):
                assert torch.equal(logits[at], eight[i]), (batch, at)
                assert tokens[at] == eight_tokens[i], (batch, at)
        assert torch.equal(eight[3:6], eight[[2, 1, 0]]) and eight_tokens[3:6] == eight_tokens[2::-1]
        engine.close()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("setting, match", [
    (dict(backend="transformers"), "engine.deterministic: runs on the native backend only"),
    (dict(quantization="fp8"), "engine.deterministic: has no fp8 kernels yet"),
    (dict(decode_attention="sdpa"), "engine.deterministic: decodes with the Triton kernel"),
])
def test_deterministic_refuses_what_it_does_not_cover(setting, match):
    with pytest.raises(JobError, match=match):
        check_engine(EngineSpec(deterministic=True, device="cpu", **setting))


def test_the_fingerprint_refuses_to_resume_with_the_mode_changed():
    old = {"engine.deterministic": True, "engine.dtype": "bfloat16"}
    assert changed_keys(old, {**old, "engine.deterministic": False}) == ["engine.deterministic"]
    assert changed_keys({"engine.dtype": "bfloat16"}, {**old, "engine.deterministic": True}) == \
        ["engine.deterministic"]  # a folder written before the key existed ran without the mode
    assert changed_keys({"engine.dtype": "bfloat16"}, {**old, "engine.deterministic": False}) == []


def test_the_mode_on_a_machine_without_a_gpu_is_one_line_at_validate(monkeypatch):
    """Its kernels need CUDA (the tests interpret them: TRITON_INTERPRET=1); without a GPU and without the
    interpreter, the job is refused naming the key, before any model loads."""
    from batchvl.engine.factory import check_deterministic

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(JobError, match="engine.deterministic: needs a CUDA GPU"):
        check_deterministic(EngineSpec(device="cpu", deterministic=True))
    check_deterministic(EngineSpec(device="cpu"))  # the mode off: nothing to check
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_deterministic(EngineSpec(device="cpu", deterministic=True))
