"""Choosing the next token on the device, without host synchronisation.

Greedy is argmax. Sampling applies, in transformers' order, repetition penalty, temperature, top-k and
top-p, then draws with the Gumbel-max trick from noise that is a pure function of (seed, row, step, token):
a row's draws do not depend on which batch it ran in, and nothing here reads a value back to the host.
`step` is each row's own count of tokens generated so far, so a row admitted into a running batch draws
what it would have drawn alone.
"""

from __future__ import annotations

import zlib

import torch

from batchvl.engine.base import GenerationParams

_MASK32 = 0xFFFFFFFF


def row_seed(seed: int, row_id: str) -> int:
    """A 32-bit seed for one row, stable across runs and batches."""
    return zlib.crc32(row_id.encode("utf-8"), seed & _MASK32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (murmur3's finaliser) on int64 tensors holding values < 2^32."""
    x = x & _MASK32
    x = (x ^ (x >> 16)) * 0x85EBCA6B & _MASK32
    x = (x ^ (x >> 13)) * 0xC2B2AE35 & _MASK32
    return x ^ (x >> 16)


def uniform_noise(row_seeds: torch.Tensor, step: torch.Tensor | int, vocab: int) -> torch.Tensor:
    """U(0, 1) noise [B, V], a deterministic function of each row's seed, its step (an int for every row,
    or [B] int64, one per row) and the token id."""
    tokens = torch.arange(vocab, device=row_seeds.device, dtype=torch.int64)
    if isinstance(step, torch.Tensor):
        step = step[:, None]  # [B, 1]
    h = _mix32(row_seeds[:, None] * 0x9E3779B1 + _mix32(step + tokens[None, :] * 0x632BE5AB))
    h = _mix32(h + 0x7F4A7C15)
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)


class Sampler:
    def __init__(self, params: GenerationParams, vocab: int):
        self.p = params
        self.vocab = vocab

    def block_early(self, logits: torch.Tensor, block: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
        """`block`'s ids at -inf in the rows whose step is below min_new_tokens."""
        if not isinstance(step, torch.Tensor):
            return logits.index_fill(1, block, float("-inf")) if step < self.p.min_new_tokens else logits
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device).index_fill_(0, block, True)
        early = (step < self.p.min_new_tokens)[:, None]  # [B, 1]
        return logits.masked_fill(early & banned[None, :], float("-inf"))

    def apply_penalty(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """transformers' repetition penalty over every token already in the row (prompt included)."""
        pen = self.p.repetition_penalty
        if pen == 1.0 or seen is None:
            return logits
        return torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None, row_seeds: torch.Tensor,
                 step: torch.Tensor | int, block: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] float32 -> token ids [B]. `step`: tokens each row has generated so far, [B] int64
        (or one int for all rows). `block` [K]: token ids (EOS) a row may not choose while its step is below
        min_new_tokens."""
        p = self.p
        logits = logits[:, : self.vocab]
        if block is not None and p.min_new_tokens > 0:
            logits = self.block_early(logits, block, step)
        logits = self.apply_penalty(logits, seen)
        if p.greedy:
            return logits.argmax(dim=-1)
        logits = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1)  # ascending, as transformers does
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - p.top_p)
            drop[:, -1] = False  # always keep the most likely token
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
        gumbel = -torch.log(-torch.log(uniform_noise(row_seeds, step, logits.shape[-1])))
        return (logits + gumbel).argmax(dim=-1)
