"""The batch-invariant kernels of `engine.deterministic` (bi_matmul, bi_rmsnorm, bi_layernorm, and the decode
attention's merge), under TRITON_INTERPRET=1 (set in conftest): each against a torch reference, and each row's
output bit for bit the same in batches of 1, 3 and 8 rows, wherever the row sits in its batch.

Here the kernels run in Triton's interpreter, whose `tl.dot` bi_matmul avoids (see its docstring); they have not
yet run on a GPU (issue 21's GPU proof).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from batchvl.kernels import bi_layernorm, bi_matmul, bi_rmsnorm, decode_attention
from batchvl.models.layers import RMSNorm

# the torch reference, beside the kernel (the package's `bi_matmul` is the function, not the module)
bi_matmul_reference = importlib.import_module("batchvl.kernels.bi_matmul").bi_matmul_reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def batches(fn, rows: torch.Tensor, among: int = 70) -> list[tuple[str, torch.Tensor]]:
    """fn's output for each of `rows` [8, ...], computed in batches of 1, 3 and 8 rows and with the rows at other
    places (reversed, and spread among `among` filler rows: with 70, the last falls in bi_matmul's second 64-row
    tile), back in `rows`' order."""
    n = rows.shape[0]
    filler = randn(among, *rows.shape[1:], dtype=rows.dtype, seed=99)
    out = [("alone", torch.cat([fn(rows[i : i + 1]) for i in range(n)]))]
    threes = [torch.cat([filler[:2], rows[i : i + 1]]) if i % 2 else torch.cat([rows[i : i + 1], filler[:2]])
              for i in range(n)]  # the row first or last of three
    out.append(("in threes", torch.cat([fn(t)[2 if i % 2 else 0][None] for i, t in enumerate(threes)])))
    out.append(("reversed eight", fn(rows.flip(0)).flip(0)))
    at = [3 + (among - 3) // n * i for i in range(n)]  # with 70: rows 3, 11, ..., 59, and 67 past the first tile
    mixed = filler.clone()
    mixed[at] = rows
    out.append(("among 70", fn(mixed)[at]))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m, k, n, bias", [(5, 40, 24, True), (70, 130, 160, False)])
def test_bi_matmul_matches_the_float32_reference(m, k, n, bias, dtype):
    x, w = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype, seed=1) / k**0.5
    b = randn(n, dtype=dtype, seed=2) if bias else None
    x3 = x.view(1, m, k)  # leading dims flatten to rows
    assert bi_matmul(x3, w, b).shape == (1, m, n)
    torch.testing.assert_close(bi_matmul(x3, w, b), bi_matmul_reference(x3, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bi_matmul_rows_are_bit_identical_in_any_batch(dtype):
    w, b = randn(96, 300, dtype=dtype, seed=1) / 17, randn(96, dtype=dtype, seed=2)
    rows = randn(8, 300, dtype=dtype, seed=4)
    whole = bi_matmul(rows, w, b)
    for how, out in batches(lambda x: bi_matmul(x, w, b), rows):
        assert torch.equal(out, whole), how


def test_the_invariance_check_sees_a_changed_reduction_order():
    """What the bit-for-bit check guards: a tile choice that changed with M (here another BLOCK_K, as a choice by
    M would give) sums in another order and changes float32 bits, and so would fail the test above."""
    x, w = randn(8, 300), randn(96, 300, seed=1)
    assert not torch.equal(bi_matmul(x, w, block_k=16), bi_matmul(x, w))
    assert not torch.equal(bi_matmul(x, w, block_n=16, block_k=128), bi_matmul(x, w))


def test_bi_matmul_refuses_what_it_cannot_run():
    x, w = torch.ones(2, 32), torch.ones(16, 32)
    with pytest.raises(ValueError, match="weight must be \\[N, K\\] in x's dtype"):
        bi_matmul(x, w.half())
    with pytest.raises(ValueError, match="x must be \\[..., K\\] with K = 32"):
        bi_matmul(torch.ones(2, 31), w)
    with pytest.raises(ValueError, match="bias must be \\[16\\]"):
        bi_matmul(x, w, torch.ones(15))
    with pytest.raises(ValueError, match="last dims of x and weight must be contiguous"):
        bi_matmul(torch.ones(32, 2).t(), w)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        bi_matmul(x, w, block_k=48)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        bi_matmul(x.double(), w.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m, k", [(3, 200), (2, 5000)])  # 5000: two chunks of 4096
def test_bi_rmsnorm_equals_the_models_rmsnorm(m, k, dtype):
    norm = RMSNorm(k, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + randn(k, seed=5) / 4)
    x = randn(m, k, dtype=dtype) * 3
    with torch.no_grad():
        torch.testing.assert_close(bi_rmsnorm(x, norm.weight, norm.eps), norm(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m, k, bias", [(3, 200, False), (2, 5000, True)])
def test_bi_layernorm_equals_torch_layernorm(m, k, bias, dtype):
    norm = torch.nn.LayerNorm(k, eps=1e-5, bias=bias).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + randn(k, seed=5) / 4)
        if bias:
            norm.bias.copy_(randn(k, seed=6))
        x = randn(m, k, dtype=dtype) * 3 + 1
        torch.testing.assert_close(bi_layernorm(x, norm.weight, norm.bias, norm.eps), norm(x))


def test_norm_rows_are_bit_identical_in_any_batch():
    """One program per row: the norms have no tile a row could move within, so a few filler rows do."""
    w, b = 1 + randn(200, seed=5) / 4, randn(200, seed=6)
    rows = randn(8, 200, seed=4) * 3
    for fn in (lambda x: bi_rmsnorm(x, w, 1e-6), lambda x: bi_layernorm(x, w, b, 1e-5)):
        whole = fn(rows)
        for how, out in batches(fn, rows, among=11):
            assert torch.equal(out, whole), how


def test_norms_refuse_a_weight_of_another_shape_or_dtype():
    x = torch.ones(2, 16)
    with pytest.raises(ValueError, match="weight must be \\[16\\] torch.float32"):
        bi_rmsnorm(x, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="bias must be \\[16\\] torch.float32"):
        bi_layernorm(x, torch.ones(16), torch.ones(16).half(), 1e-6)


def test_decode_attention_rows_do_not_depend_on_the_batch_or_the_span():
    """Each row attends over its own length; the result must not change with the other rows, their number, or
    the span the cache is cut at (the number of pieces the ordered merge adds, in order). The interpreter sums a
    [pieces, D] block in order anyway; on the GPU a tree sum over the pieces would not, which the GPU proof
    (identical text with CUDA graphs, whose span is the cache's) covers."""
    b, h, hkv, d = 4, 2, 1, 16
    lengths = torch.tensor([40, 7, 33, 48])
    q, k, v = randn(b, h, d, seed=7), randn(b, hkv, 80, d, seed=8), randn(b, hkv, 80, d, seed=9)
    whole = decode_attention(q, k[:, :, :48], v[:, :, :48], lengths, chunk=16, ordered=True)  # 3 pieces
    wide = decode_attention(q, k, v, lengths, chunk=16, ordered=True)  # 5 pieces
    assert torch.equal(wide, whole)
    alone = torch.cat([decode_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], lengths[i : i + 1], chunk=16,
                                        ordered=True) for i in range(b)])
    assert torch.equal(alone, whole)
    torch.testing.assert_close(decode_attention(q, k, v, lengths, chunk=16), wide)  # the tree merge: same sums
