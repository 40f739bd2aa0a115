"""Decode attention over a static KV cache, each row attending to its own length only (split-K).

One query token per row. The cache is batchvl's preallocated layout, one layer's slice:
K and V [B, Hkv, S, D], where S is the allocated span and row b holds `lengths[b]` valid positions.
SDPA with a [B, 1, 1, S] mask reads all S positions of every row and, for grouped-query attention,
may read each KV head once per query head. This kernel reads each row's valid keys and values once:
- one program per (row, KV head, split of the span): the G = H / Hkv query heads that share the KV head
  are the rows of one small matrix product, so K and V are read once for the whole group;
- the span is cut into `splits` pieces processed in parallel (flash-decoding); a piece past the row's
  length exits at once, so short rows cost nothing;
- a second kernel merges the pieces' partial softmax sums: as a tree by default, or (`ordered`, the
  deterministic mode) one piece after the other, so that a row's result does not depend on the span (the
  number of pieces), only on its own length.
The grid depends only on (B, Hkv, splits), never on the lengths' values: the call is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, len_ptr, acc_ptr, stat_ptr,
                    sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                    scale_log2, splits,
                    CHUNK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + b)
    start = split * CHUNK
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    heads = kvh * G + g  # the query heads of this KV head
    # partial results: acc [B, H, splits, D] float32, stat [B, H, splits, 2] (running max, running sum)
    out_row = (b * (tl.num_programs(1) * G) + heads) * splits + split
    if start >= length:
        # Nothing to attend in this piece: an empty partial (max -inf, sum 0) that the merge ignores.
        tl.store(stat_ptr + out_row * 2, tl.full([BLOCK_G], float("-inf"), tl.float32), mask=g_ok)
        tl.store(stat_ptr + out_row * 2 + 1, tl.zeros([BLOCK_G], tl.float32), mask=g_ok)
        return
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_D]
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    end = tl.minimum(start + CHUNK, length)
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sv_b + kvh * sv_h
    # A fixed trip count (CHUNK is a compile-time constant); blocks past the row's end are masked loads that
    # move no bytes.
    for i in range(0, CHUNK // BLOCK_N):
        n = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k = tl.load(k_base + n[:, None] * sk_s + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + n[:, None] * sv_s + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        # float32 operands (tf32 on the GPU, exact for bf16 values): Triton's interpreter mis-multiplies bf16.
        logits = tl.dot(q, tl.trans(k.to(tl.float32))) * scale_log2  # [BLOCK_G, BLOCK_N], log2 units
        logits = tl.where(n_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        p = tl.exp2(logits - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        s = s * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        m = m_new
    tl.store(acc_ptr + out_row[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
    tl.store(stat_ptr + out_row * 2, m, mask=g_ok)
    tl.store(stat_ptr + out_row * 2 + 1, s, mask=g_ok)


@triton.jit
def _merge_kernel(acc_ptr, stat_ptr, out_ptr, so_b, so_h, heads, splits,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, ORDERED: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    first = (b * heads + h) * splits  # this (row, head)'s first piece
    if ORDERED:
        m_all = tl.max(tl.load(stat_ptr + (first + i) * 2, mask=i < splits, other=float("-inf")), 0)  # exact
        # The pieces are added one at a time, first to last: a row's sum is then the same whatever the span (the
        # number of pieces, hence BLOCK_S), as the pieces past its length add exact zeros at the end. A tree sum
        # over BLOCK_S groups the same pieces differently for another span (the deterministic mode needs this).
        acc = tl.zeros([BLOCK_D], tl.float32)
        total = 0.0
        for j in range(0, BLOCK_S):
            ok = j < splits
            s = tl.load(stat_ptr + (first + j) * 2 + 1, mask=ok, other=0.0)
            w = tl.where(s > 0, tl.exp2(tl.load(stat_ptr + (first + j) * 2, mask=ok, other=0.0) - m_all), 0.0)
            acc += tl.load(acc_ptr + (first + j) * BLOCK_D + d, mask=ok & (s > 0), other=0.0) * w
            total += s * w  # empty pieces (max -inf, sum 0) weigh nothing
        out = acc / total
    else:
        i_ok = i < splits
        row = first + i  # [BLOCK_S]
        m = tl.load(stat_ptr + row * 2, mask=i_ok, other=float("-inf"))
        s = tl.load(stat_ptr + row * 2 + 1, mask=i_ok, other=0.0)
        m_all = tl.max(m, 0)
        w = tl.where(i_ok & (s > 0), tl.exp2(m - m_all), 0.0)  # empty pieces (max -inf) weigh nothing
        acc = tl.load(acc_ptr + row[:, None] * BLOCK_D + d[None, :], mask=(i_ok & (s > 0))[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(s * w, 0)
    tl.store(out_ptr + b * so_b + h * so_h + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     chunk: int = 512, scale: float | None = None, ordered: bool = False, block_n: int = 64,
                     num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Attention of one new token per row over its cached keys and values.

    q [B, H, D]; k, v [B, Hkv, S, D] (any batch/head/position strides, the last dim contiguous);
    lengths [B] int, 1 <= lengths[b] <= S: row b attends to positions [0, lengths[b]).
    H must be a multiple of Hkv. `chunk` positions per split; the span S fixes the number of splits. `ordered`
    merges the splits one after the other, so that a row's result does not depend on S (engine.deterministic);
    by default they merge as a tree, as measured on the GPU. `block_n` (positions a loop step, at most `chunk`),
    `num_warps` and `num_stages` tune the first kernel (block_n regroups a split's running sums: float32 rounding).
    On the H200 chunk 1024 with 3 stages ran a step's attention at caption lengths 1.19x (1B) and 1.12x (8B) faster
    than these defaults (decode_tune.py, session 11). Where rows are shorter than the span (`mixed`), a split of
    1,024 positions leaves fewer programs and the longest rows' splits may set the time; one pipeline run of `mixed`
    with them could not tell (BENCHMARKS.md). The defaults stay until decode_tune.py measures `mixed` lengths.
    Returns [B, H, D] in q's dtype; softmax and sums in float32.
    """
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, H, D] and k, v [B, Hkv, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, heads, d = q.shape
    kb, kv_heads, span, kd = k.shape
    if kb != b or kd != d or heads % kv_heads:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the head dimension of q, k and v must be contiguous")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if lengths.shape != (b,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be an int tensor of shape [{b}]; got {lengths.dtype} {tuple(lengths.shape)}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16; got {chunk}")
    group = heads // kv_heads
    splits = triton.cdiv(span, chunk)
    block_d = triton.next_power_of_2(d)
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    block_n = min(block_n, chunk)
    acc = torch.empty((b, heads, splits, block_d), device=q.device, dtype=torch.float32)
    stat = torch.empty((b, heads, splits, 2), device=q.device, dtype=torch.float32)
    out = torch.empty((b, heads, d), device=q.device, dtype=q.dtype)
    scale = d ** -0.5 if scale is None else scale
    _partial_kernel[(b, kv_heads, splits)](
        q, k, v, lengths, acc, stat,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        scale * 1.4426950408889634, splits,
        CHUNK=chunk, G=group, D=d, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
        num_stages=num_stages)
    _merge_kernel[(b, heads)](acc, stat, out, out.stride(0), out.stride(1), heads, splits,
                              D=d, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)), ORDERED=ordered)
    return out
