"""Triton kernels against plain torch references, on the CPU under TRITON_INTERPRET=1 (set in conftest).

The GPU check of the same kernels is `batchvl bench-kernels` (see BENCHMARKS.md).
"""

from __future__ import annotations

import pytest
import torch

from batchvl.kernels import decode_attention


def reference_decode_attention(q, k, v, lengths):
    """float64 softmax attention of one query per row over positions [0, lengths[b])."""
    b, heads, d = q.shape
    group = heads // k.shape[1]
    out = torch.empty(b, heads, d, dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        keys = k[i, :, :n].double().repeat_interleave(group, 0)  # [H, n, D]
        values = v[i, :, :n].double().repeat_interleave(group, 0)
        w = torch.softmax((keys @ q[i].double()[:, :, None])[..., 0] / d ** 0.5, -1)  # [H, n]
        out[i] = (w[:, None, :] @ values)[:, 0]
    return out


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


# (rows, query heads, KV heads, span, head dim, chunk): groups of 1, 2, 4 and 7 query heads per KV head,
# a head dim that is not a power of two (Phi-3: 96), spans that are and are not a multiple of the chunk.
SHAPES = [
    (3, 14, 2, 200, 64, 64),
    (2, 4, 4, 100, 96, 32),
    (4, 8, 2, 300, 128, 128),
    (2, 28, 4, 130, 128, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}-H{s[1]}-Hkv{s[2]}-S{s[3]}-D{s[4]}" for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_attention_matches_reference(shape, dtype):
    b, heads, kv_heads, span, d, chunk = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    # The cache is larger than the span the kernel is given (more rows, more positions), as the engine's is:
    # the kernel must honour the strides of a slice.
    big = torch.randn(b + 2, kv_heads, span + 37, d, generator=gen).to(dtype)
    big_v = torch.randn(b + 2, kv_heads, span + 37, d, generator=gen).to(dtype)
    k, v = big[:b, :, :span], big_v[:b, :, :span]
    q = torch.randn(b, heads, d, generator=gen).to(dtype)
    # Lengths at the edges: one position, a chunk boundary and one past it, the full span.
    lengths = torch.tensor([1, chunk, chunk + 1, span, span - 1][:b], dtype=torch.int64)
    out = decode_attention(q, k, v, lengths, chunk=chunk)
    assert out.shape == (b, heads, d) and out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = reference_decode_attention(q, k, v, lengths)
    # float32: exact softmax arithmetic; bf16: the output's own rounding (2^-9 relative) dominates.
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 8e-3)


def test_decode_attention_ignores_positions_past_each_length():
    """Keys and values past a row's length must not matter, even when they hold NaN or huge values."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 32, generator=gen)
    k = torch.randn(2, 2, 64, 32, generator=gen)
    v = torch.randn(2, 2, 64, 32, generator=gen)
    lengths = torch.tensor([5, 40])
    clean = decode_attention(q, k, v, lengths, chunk=16)
    k[0, :, 5:] = float("nan")
    v[0, :, 5:] = 1e30
    k[1, :, 40:] = float("nan")
    dirty = decode_attention(q, k, v, lengths, chunk=16)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(2, 4, 1, 32)), "expected q"),
    (dict(k=torch.zeros(3, 2, 64, 32), v=torch.zeros(3, 2, 64, 32)), "do not match"),
    (dict(q=torch.zeros(2, 3, 32)), "do not match"),  # 3 query heads over 2 KV heads
    (dict(k=torch.zeros(2, 2, 32, 64).transpose(2, 3), v=torch.zeros(2, 2, 32, 64).transpose(2, 3)),
     "contiguous"),
    (dict(lengths=torch.tensor([1.0, 2.0])), "lengths"),
    (dict(chunk=48), "chunk"),
])
def test_decode_attention_rejects_bad_inputs(bad, match):
    args = dict(q=torch.zeros(2, 4, 32), k=torch.zeros(2, 2, 64, 32), v=torch.zeros(2, 2, 64, 32),
                lengths=torch.tensor([1, 2]), chunk=16)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        decode_attention(**args)
