"""The decoder-only language model every InternVL family shares, over a preallocated KV cache.

Qwen2, Qwen3, InternLM2, Llama and Phi-3 differ only in how their configs and weights are spelled, in biases,
in rotary scaling and in Qwen3's per-head q/k RMSNorm; each family's file maps its config to a `DecoderSpec` and
its weight names onto this module. q/k/v and gate/up are fused into one matmul each.

Two entry points, both with static shapes per call:
- `prefill(x, lengths, cache)`: right-padded prompts [B, P]; writes K/V at positions 0..P-1.
- `decode(x, positions, cache)`: one token per row at its own position; writes K/V there and attends to
  cache positions <= its own. No host synchronisation: it can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from batchvl.models.layers import RMSNorm
from batchvl.models.rope import RopeSpec, apply_rope, rope_tables


@dataclass(frozen=True)
class DecoderSpec:
    family: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    rope: RopeSpec
    max_positions: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    qk_norm: bool = False  # RMSNorm over each head's head_dim on q and k, before the rotary embedding (Qwen3)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


class KVCache:
    """K and V for every layer, preallocated: [L, B, Hkv, S, D] each. Reused across batches; grows only
    when a batch needs more rows or positions than it has."""

    def __init__(self, spec: DecoderSpec, batch: int, positions: int, device: torch.device, dtype: torch.dtype):
        shape = (spec.layers, batch, spec.kv_heads, positions, spec.head_dim)
        # Zeros, not empty: masked positions get attention weight 0, and 0 * NaN from stale memory is NaN.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def positions(self) -> int:
        return self.k.shape[3]

    @staticmethod
    def bytes_per_token(spec: DecoderSpec, dtype: torch.dtype) -> int:
        return 2 * spec.layers * spec.kv_width * torch.empty((), dtype=dtype).element_size()


class DecoderLayer(nn.Module):
    def __init__(self, s: DecoderSpec, index: int):
        super().__init__()
        self.s, self.index = s, index
        self.input_norm = RMSNorm(s.hidden, s.eps)
        self.qkv = nn.Linear(s.hidden, s.q_width + 2 * s.kv_width, bias=s.qkv_bias)
        if s.qk_norm:  # one weight [D] shared by all heads
            self.q_norm = RMSNorm(s.head_dim, s.eps)
            self.k_norm = RMSNorm(s.head_dim, s.eps)
        self.o = nn.Linear(s.q_width, s.hidden, bias=s.o_bias)
        self.post_norm = RMSNorm(s.hidden, s.eps)
        self.gate_up = nn.Linear(s.hidden, 2 * s.intermediate, bias=s.mlp_bias)
        self.down = nn.Linear(s.intermediate, s.hidden, bias=s.mlp_bias)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        s = self.s
        b, n, _ = x.shape
        q, k, v = self.qkv(self.input_norm(x)).split([s.q_width, s.kv_width, s.kv_width], dim=-1)
        q = q.view(b, n, s.heads, s.head_dim)  # [B, N, H, D]
        k = k.view(b, n, s.kv_heads, s.head_dim)  # [B, N, Hkv, D]
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, N, D], [B, Hkv, N, D]
        v = v.view(b, n, s.kv_heads, s.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        return q, k, v

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = attn.shape
        x = x + self.o(attn.transpose(1, 2).reshape(b, n, self.s.q_width))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def prefill(self, x, cos, sin, cache: KVCache, rows: int | torch.Tensor = 0, lengths: list[int] | None = None,
                attention=None) -> torch.Tensor:
        """`rows`: the cache rows the batch's K/V go to: rows .. rows + B when an int, else a [B] index tensor
        (slots of a running batch need not be adjacent). `attention(q, k, v, lengths, gqa)`, when given with the
        rows' prompt `lengths` (a host list), replaces the causal SDPA over the padded batch (the deterministic
        mode's per-row attention)."""
        q, k, v = self._qkv(x, cos, sin)
        b, n = x.shape[0], x.shape[1]
        at = slice(rows, rows + b) if isinstance(rows, int) else rows
        cache.k[self.index, at, :, :n] = k
        cache.v[self.index, at, :, :n] = v
        # Plain causal attention (flash kernels): rows are right-padded, so a real token's keys are all real;
        # padding positions compute garbage that nothing reads, and decode overwrites their cache entries.
        gqa = self.s.kv_heads != self.s.heads
        if attention is not None:
            attn = attention(q, k, v, lengths, gqa)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self._finish(x, attn)

    def decode(self, x, cos, sin, positions, rows, span: int, mask, cache: KVCache, kernel=None,
               lengths=None) -> torch.Tensor:
        """One token per row. `kernel` (batchvl.kernels.decode_attention) attends over each row's own
        `lengths` (positions + 1); without it, SDPA over the whole span under `mask`."""
        q, k, v = self._qkv(x, cos, sin)  # N = 1
        b = x.shape[0]
        cache.k[self.index, rows, :, positions] = k[:, :, 0]
        cache.v[self.index, rows, :, positions] = v[:, :, 0]
        keys = cache.k[self.index, :b, :, :span]  # [B, Hkv, span, D]
        values = cache.v[self.index, :b, :, :span]
        if kernel is not None:
            attn = kernel(q[:, :, 0], keys, values, lengths)[:, :, None]  # [B, H, 1, D]
        else:
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                  enable_gqa=self.s.kv_heads != self.s.heads)
        return self._finish(x, attn)


class DecoderLM(nn.Module):
    def __init__(self, s: DecoderSpec):
        super().__init__()
        self.spec = s
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(DecoderLayer(s, i) for i in range(s.layers))
        self.norm = RMSNorm(s.hidden, s.eps)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)
        self._rope: tuple[torch.Tensor, ...] | None = None
        self.attention_kernel = None  # set to batchvl.kernels.decode_attention to use it in decode
        self.prefill_attention = None  # set to replace prefill's SDPA (see DecoderLayer.prefill)

    def tie_weights(self) -> None:
        if self.spec.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def pad_head(self, multiple: int) -> None:
        """Give the LM head's weight zero rows up to a multiple of `multiple` (the embeddings' too where they are
        tied: they only ever look up the real rows), so that each row of the head's product starts aligned.
        InternVL2-1B's vocabulary of 151,655 and InternVL3-8B's of 151,674 leave rows aligned to 1 and 2 elements,
        and cuBLAS falls back to kernels for unaligned rows: on the H200 the 1B's head took 0.42 ms of each 3.0 ms
        decode step in an sm75 kernel (BENCHMARKS.md, session 9). `logits` cuts the padding off."""
        w, vocab = self.lm_head.weight, self.spec.vocab
        rows = -(-vocab // multiple) * multiple
        if w.shape[0] != vocab or rows == vocab:
            return
        padded = nn.Parameter(torch.cat([w.detach(), w.new_zeros(rows - vocab, w.shape[1])]), requires_grad=False)
        if self.embed.weight is w:
            self.embed.weight = padded
        self.lm_head.weight = padded

    def rope(self, positions_needed: int) -> tuple[torch.Tensor, ...]:
        """cos/sin tables [P, rot] covering `positions_needed`, computed once for the longest seen.

        For longrope, two pairs: the short-factor tables and the long-factor ones. transformers switches to the
        long factors for a forward pass whose length exceeds the original context, and the KV cache keeps
        the keys of earlier passes as they were rotated; `_pick` reproduces that per row (see there).
        """
        if self._rope is None or self._rope[0].shape[0] < positions_needed:
            device, dtype = self.embed.weight.device, self.embed.weight.dtype
            spec = self.spec.rope
            tables = rope_tables(spec, positions_needed, device, dtype)
            if spec.kind == "longrope":
                tables += rope_tables(spec, positions_needed, device, dtype, seq_len_hint=spec.switch_length + 1)
            self._rope = tables
        return self._rope

    def _pick(self, tables: tuple[torch.Tensor, ...], index: torch.Tensor, seq_len: torch.Tensor):
        """cos/sin at `index` ([B, N] positions), from the long tables where the pass's length `seq_len`
        ([B, 1]) exceeds the switch length. Run alone, a row's prefill pass has its prompt length and each
        decode pass its position + 1, which is what makes this per row and independent of the batch."""
        cos, sin = tables[0][index], tables[1][index]  # [B, N, rot]
        if len(tables) == 4:
            long = (seq_len > self.spec.rope.switch_length)[..., None]
            cos = torch.where(long, tables[2][index], cos)
            sin = torch.where(long, tables[3][index], sin)
        return cos, sin

    def prefill(self, x: torch.Tensor, lengths: torch.Tensor, cache: KVCache,
                rows: int | torch.Tensor = 0, host_lengths: list[int] | None = None) -> torch.Tensor:
        """x [B, P, C] right-padded embeddings, lengths [B] -> final hidden state of each row's last token [B, C].
        The rows' K/V go to cache rows rows .. rows + B, or to the cache rows a [B] index tensor names (a batch
        may be prefilled in row chunks, and into slots of a running batch that are not adjacent). `host_lengths`:
        the same lengths as a host list, where the caller has them (the replacement attention needs them there)."""
        b, p, _ = x.shape
        idx = torch.arange(p, device=x.device)
        cos, sin = self._pick(self.rope(p), idx[None].expand(b, -1), lengths[:, None])  # [B, P, rot]
        # The replacement attention (the deterministic mode's, per row) takes the lengths on the host: the caller's,
        # or read once here (a wait for the device), not once per layer.
        if self.prefill_attention is not None and host_lengths is None:
            host_lengths = lengths.tolist()
        for layer in self.layers:
            x = layer.prefill(x, cos, sin, cache, rows, host_lengths, self.prefill_attention)
        last = x[torch.arange(b, device=x.device), lengths - 1]  # [B, C]
        return self.norm(last)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, span: int) -> torch.Tensor:
        """x [B, 1, C] embeddings of each row's newest token, at positions [B]; attends over cache positions
        [0, span). Returns the final hidden state [B, C]."""
        cos, sin = self._pick(self.rope(span), positions[:, None], positions[:, None] + 1)  # [B, 1, rot]
        kernel = self.attention_kernel
        mask = lengths = None
        if kernel is not None:
            lengths = positions + 1
        else:
            mask = (torch.arange(span, device=x.device)[None, :] <= positions[:, None])[:, None, None]  # [B,1,1,S]
        rows = torch.arange(x.shape[0], device=x.device)  # once per step, not once per layer
        for layer in self.layers:
            x = layer.decode(x, cos, sin, positions, rows, span, mask, cache, kernel, lengths)
        return self.norm(x[:, 0])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head, only where a token is sampled: [B, C] -> [B, V] float32 (without pad_head's rows)."""
        return self.lm_head(h)[:, : self.spec.vocab].float()
