"""The LM head padded to aligned rows (DecoderLM.pad_head): the same logits and the same tokens, tied or not."""

from __future__ import annotations

import torch

from batchvl.engine.base import GenerationParams
from batchvl.engine.native import NativeEngine
from batchvl.models.checkpoint import CheckpointInfo
from batchvl.models.decoder import DecoderLM
from batchvl.models.loader import load_model

CPU = torch.device("cpu")


def test_the_padded_head_gives_the_same_logits_and_embeddings_tied_or_not(tiny_model):
    lm = load_model(CheckpointInfo.read(tiny_model), CPU, torch.float32).model.lm
    vocab = lm.spec.vocab
    h = torch.randn(5, lm.spec.hidden, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 7, vocab - 1]])
    for tied in (False, True):
        if tied:
            lm.lm_head.weight = lm.embed.weight
        with torch.inference_mode():
            want, embedded = lm.logits(h), lm.embed(ids)
        lm.pad_head(multiple=100)  # 512 -> 600 rows
        assert lm.lm_head.weight.shape[0] == 600 and lm.spec.vocab == vocab
        assert (lm.embed.weight is lm.lm_head.weight) == tied  # tied weights stay one tensor
        assert lm.lm_head.weight[vocab:].abs().sum() == 0
        with torch.inference_mode():
            got = lm.logits(h)
            assert got.shape == (5, vocab)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(lm.embed(ids), embedded, rtol=0, atol=0)
        lm.pad_head(multiple=100)  # a second call changes nothing
        assert lm.lm_head.weight.shape[0] == 600


def test_the_engine_generates_the_same_tokens_with_a_padded_head(tiny_rows, monkeypatch):
    ck, tokenizer, rows = tiny_rows
    params = GenerationParams(max_new_tokens=10, eos_token_ids=(tokenizer.eos_token_id,))
    tokens = {}
    pad = DecoderLM.pad_head
    for name, multiple in (("unpadded", 1), ("padded", 1000)):  # 512 rows -> 1000
        # the engine pads on CUDA only; here it pads on the CPU too, to `multiple`
        monkeypatch.setattr(DecoderLM, "pad_head", lambda self, _, multiple=multiple: pad(self, multiple))
        engine = NativeEngine(ck, tokenizer, params, device="cpu", dtype="float32", max_batch_size=4)
        assert engine.model.lm.lm_head.weight.shape[0] == (512 if multiple == 1 else 1000)
        engine.generate(rows)  # a 7-tile image, two images, a small image, text only
        tokens[name] = engine.last_tokens
        engine.close()
    assert tokens["padded"] == tokens["unpadded"]
