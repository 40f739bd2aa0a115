"""One batch on the device: its slots, each slot's progress, and the KV cache they write.

The native engine runs a batch as a fixed number of slots (rows of the KV cache). Everything that
changes while the batch runs is here, one entry per slot: the request, its prompt length, its own
max_new_tokens, the cache position its newest token goes to, how many tokens it has generated, whether it
is done, its sampler seed, the tokens it has seen (repetition penalty) and the tokens it generated.

The steps are methods: `fill` and `admit` prefill rows into slots and take each one's first token,
`decode` takes the next token in every slot, `sync` is the one host synchronisation. Methods rather than
free functions because each step moves several fields together (a slot's position, count and done flag
advance in step; admit resets all of a slot's fields at once): the invariants live in one class. The
model work itself is ModelRunner's, which knows nothing of rows.

Slots do not depend on each other or on the batch's step: sampling noise and min_new_tokens use each
slot's own count, so a row admitted into a running batch generates what it would have generated alone.
A done slot stops moving: its position stays where its last token went (inside the cache's span), its
later "tokens" are the pad id, written to a spare column of the output buffer, and it never reads or
writes another slot's cache row. A slot never filled is done from the start, at position 0.

Run its steps under torch.inference_mode(), as NativeEngine._run does (the cache is an inference tensor).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from batchvl.core import Request
from batchvl.engine.base import GenerationParams
from batchvl.engine.model_runner import ModelRunner
from batchvl.engine.sampler import Sampler, row_seed
from batchvl.models.decoder import KVCache

log = logging.getLogger(__name__)


@dataclass
class SlotTensors:
    """A batch state's per-slot tensors. Where the whole decode step is one graph, every batch of a size uses the
    same ones (DecodeGraphs.state), so `reset` gives them a new batch's values in place."""

    lengths: torch.Tensor  # [B] prompt lengths
    positions: torch.Tensor  # [B] where `tokens` go in the cache
    limits: torch.Tensor  # [B] each row's max_new_tokens
    count: torch.Tensor  # [B] tokens generated so far
    done: torch.Tensor  # [B] bool: a free slot is done
    seeds: torch.Tensor  # [B] the sampler's row seeds
    tokens: torch.Tensor  # [B] the next decode's input
    out: torch.Tensor  # [B, width + 1]: column `width` takes done slots' pad tokens, so a full row is never overwritten
    seen: torch.Tensor | None  # [B, V] bool: tokens already in each row, only for the repetition penalty

    @classmethod
    def new(cls, slots: int, width: int, seen_vocab: int | None, device: torch.device) -> SlotTensors:
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(zeros(slots), zeros(slots), zeros(slots), zeros(slots), zeros(slots, dtype=torch.bool),
                   zeros(slots), zeros(slots), zeros(slots, width + 1),
                   None if seen_vocab is None else zeros(slots, seen_vocab, dtype=torch.bool))

    def reset(self, pad_id: int) -> SlotTensors:
        """Every slot free (done), nothing generated, pad tokens throughout; returns self."""
        for t in (self.lengths, self.positions, self.limits, self.count, self.seeds):
            t.zero_()
        self.done.fill_(True)
        self.tokens.fill_(pad_id)
        self.out.fill_(pad_id)
        if self.seen is not None:
            self.seen.zero_()
        return self


class BatchState:
    """A batch of `slots` slots over `cache`, decoding over positions [0, span) of it."""

    def __init__(self, runner: ModelRunner, sampler: Sampler, params: GenerationParams, slots: int,
                 cache: KVCache, span: int, stops: torch.Tensor, eos_block: torch.Tensor, pad_id: int = 0,
                 prefill_tokens: int = 65536, step_graph: bool = False):
        if slots > cache.batch:
            raise ValueError(f"{slots} slots over a cache of {cache.batch} rows")
        self.runner, self.sampler, self.params = runner, sampler, params
        self.cache, self.span = cache, span
        self.stops, self.eos_block = stops, eos_block  # [K] token ids that end a row; [K'] ids min_new blocks
        self.pad_id, self.prefill_tokens = pad_id, prefill_tokens
        self.width = params.max_new_tokens  # the output buffer's columns; each slot's limit is at most this
        self.max_limit = 0  # the largest limit of any row admitted (host side: bounds the decode loop)
        self.requests: list[Request | None] = [None] * slots
        # engine.step_graph: the whole decode step (the model, sampling and every slot's bookkeeping) as one CUDA
        # graph, one replay per step, where the decode graph alone leaves about twenty small host calls per step,
        # each a chance to wait for the GIL (BENCHMARKS.md, session 7). Only for a batch of a decode-graph bucket's
        # size, whose shapes the decode graphs warmed up. Its tensors below are then the decode graphs' own for
        # this size and width, the same for every batch, so that the step is captured once and replayed by every
        # later batch of the job (a capture per batch cost more than the graph saved: session 8).
        graphs = runner.graphs
        self._step_graph = step_graph and graphs is not None and slots in graphs.buckets and span == graphs.span
        self._graph = None
        seen_vocab = sampler.vocab if params.repetition_penalty != 1.0 else None
        self._key = (slots, self.width, seen_vocab)  # which decode graphs' state and whole-step graph are this batch's

        def make() -> SlotTensors:
            return SlotTensors.new(slots, self.width, seen_vocab, runner.device)

        t = (graphs.state(self._key, make) if self._step_graph else make()).reset(pad_id)
        self.lengths, self.positions, self.limits, self.count = t.lengths, t.positions, t.limits, t.count
        self.done, self.seeds, self.tokens, self.out, self.seen = t.done, t.seeds, t.tokens, t.out, t.seen

    @property
    def slots(self) -> int:
        """How many rows the batch holds at once (filled, done or free)."""
        return len(self.requests)

    def fill(self, requests: list[Request], features: torch.Tensor | None) -> torch.Tensor:
        """Prefill `requests` into slots 0 .. n-1 and take their first tokens; `features` are their image
        embeddings [T * tokens_per_tile, C] in request order. Returns the first step's logits [n, V]."""
        return self._prefill(list(range(len(requests))), requests, features)

    def admit(self, slot: int, request: Request, features: torch.Tensor | None) -> torch.Tensor:
        """Prefill one row into a free `slot` (one never filled, or whose row is done) of a running batch and
        take its first token; every other slot keeps its state. `features`: the row's image embeddings.
        Returns its first step's logits [1, V]."""
        return self.admit_rows([slot], [request], features)

    def admit_rows(self, slots: list[int], requests: list[Request], features: torch.Tensor | None) -> torch.Tensor:
        """`admit` for several free slots at once, adjacent or not (ascending), in one prefill: `features`
        are the rows' image embeddings in request order. Returns the first step's logits [n, V]."""
        return self._prefill(slots, requests, features)

    def fits(self, request: Request) -> bool:
        """Whether `request` can run in this batch: its prompt and its limit within the cache's span, its limit
        within the output buffer."""
        limit = request.max_new_tokens or self.params.max_new_tokens
        return len(request.prompt_ids) + limit <= self.span and limit <= self.width

    def _prefill(self, slots: list[int], requests: list[Request], features: torch.Tensor | None) -> torch.Tensor:
        n, p, device = len(requests), self.params, self.runner.device
        if len(slots) != n or slots != sorted(set(slots)) or not 0 <= slots[0] <= slots[-1] < self.slots:
            raise IndexError(f"{n} rows into slots {slots} of a batch of {self.slots}")
        lengths_list = [len(r.prompt_ids) for r in requests]
        limits_list = [r.max_new_tokens or p.max_new_tokens for r in requests]
        for r, length, limit in zip(requests, lengths_list, limits_list, strict=True):
            if not self.fits(r):
                raise ValueError(f"row {r.id}: {length} + {limit} positions do not fit a span of {self.span} "
                                 f"with at most {self.width} new tokens")
        width = max(lengths_list)
        # One host-to-device conversion of all prompts, right-padded on the device.
        lengths = torch.tensor(lengths_list, device=device)  # [n]
        flat = torch.tensor(list(itertools.chain.from_iterable(r.prompt_ids for r in requests)), dtype=torch.long)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=device)
        ids[torch.arange(width, device=device)[None, :] < lengths[:, None]] = flat.to(device)  # [n, P]
        adjacent = slots[-1] - slots[0] == n - 1
        # The cache rows the K/V go to, and the slots whose state is reset: a slice (views, updated in place)
        # when adjacent, else one index tensor for all of them. One set of operations per admission either way,
        # not one per run of adjacent slots: scattered slots made many small runs, each a dozen host-side calls.
        rows = slice(slots[0], slots[0] + n) if adjacent else torch.tensor(slots, device=device)
        image_tokens = sum(r.prompt_ids.count(self.runner.image_token_id) for r in requests)
        logits = self.runner.prefill(ids, lengths, features, self.cache, slots[0] if adjacent else rows,
                                     self.prefill_tokens, image_tokens, lengths_list)  # [n, V]
        self._record(slots, rows, requests, ids, lengths, limits_list, logits)
        return logits

    def _record(self, slots: list[int], rows: slice | torch.Tensor, requests: list[Request], ids: torch.Tensor,
                lengths: torch.Tensor, limits: list[int], logits: torch.Tensor) -> None:
        """Reset the slots `rows` (`slots` as a slice or an index tensor) for the prefilled `requests` (and ids,
        lengths, limits, logits, in the same order) and take their first tokens."""
        p, device = self.params, self.runner.device
        for slot, request in zip(slots, requests, strict=True):
            self.requests[slot] = request
        self.lengths[rows] = lengths
        self.positions[rows] = lengths  # each row's first generated token goes right after its prompt
        self.limits[rows] = torch.tensor(limits, device=device)
        self.count[rows] = 0
        self.done[rows] = False
        self.seeds[rows] = torch.tensor([row_seed(p.seed, r.seed_key) for r in requests], device=device,
                                        dtype=torch.int64)
        self.out[rows] = self.pad_id
        if self.seen is not None:
            seen = self.seen[rows]  # a view for a slice, a copy for an index tensor
            self._see_prompts(seen, ids, requests)
            self.seen[rows] = seen
        self.max_limit = max(self.max_limit, *limits)
        self._take(logits, rows)

    def _see_prompts(self, seen: torch.Tensor, ids: torch.Tensor, requests: list[Request]) -> None:
        """seen [n, V] <- the tokens of each prompt ids [n, P] (without the padding)."""
        vocab = seen.shape[1]
        seen.zero_()
        seen.scatter_(1, ids.clamp(max=vocab - 1), True)
        seen[:, self.pad_id] = False
        for i, r in enumerate(requests):  # the pad id may be a real token of a row
            if self.pad_id in r.prompt_ids:
                seen[i, self.pad_id] = True

    def decode(self) -> None:
        """One step for every slot: run the model on each slot's newest token, then take the next one. Done
        and free slots run too (their rows are in the batch's matrices) but stay where they are."""
        if self._step_graph and self._graph is None:
            try:  # the same sampler and stop tensors as at the capture: they are read where they were then
                self._graph = self.runner.graphs.whole_step(self._key, (self.sampler, self.stops, self.eos_block),
                                                            lambda: self._step(eager=True))
            except Exception:  # noqa: BLE001 - any capture failure: the step as before, and say so once
                log.warning("the whole decode step could not be captured as a CUDA graph; decoding with the "
                            "model's graph and the sampler outside it", exc_info=True)
                self._step_graph = False
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step()

    def _step(self, eager: bool = False) -> None:
        logits = self.runner.decode(self.tokens, self.positions, self.cache, self.span, eager)  # [B, V]
        self.positions += ~self.done  # a done slot keeps its position: it never moves past its limit
        self._take(logits, slice(None))

    def _take(self, logits: torch.Tensor, rows: slice | torch.Tensor) -> None:
        """Sample the next token of the slots `rows` from their logits [n, V], and record it: output buffer,
        seen, count, done. No host synchronisation. A slice gives views, so the updates land in place (every
        decode step); an index tensor (an admission into scattered slots) gives copies, written back at the end."""
        done, count = self.done[rows], self.count[rows]  # [n]
        seen = None if self.seen is None else self.seen[rows]
        out = self.out[rows]
        token = self.sampler(logits, seen, self.seeds[rows], count, self.eos_block)  # [n]
        token = torch.where(done, self.pad_id, token)
        self.tokens[rows] = token
        column = torch.where(done, self.width, count)  # a done slot writes to the spare column
        out.scatter_(1, column[:, None], token[:, None])
        if seen is not None:  # a done slot's pad token is not a token of its row
            at = token[:, None]
            seen.scatter_(1, at, seen.gather(1, at) | ~done[:, None])
        count += ~done
        done |= torch.isin(token, self.stops) | (self.limits[rows] <= count)
        if isinstance(rows, torch.Tensor):
            self.done[rows], self.count[rows], self.out[rows] = done, count, out
            if seen is not None:
                self.seen[rows] = seen

    def sync(self, stop_hit=None) -> bool:
        """The host synchronisation: marks done the slots whose tokens so far make `stop_hit(ids) -> bool`
        true (stop strings; None: no test), and says whether every slot is done."""
        return all(self.finished(stop_hit))

    def finished(self, stop_hit=None) -> list[bool]:
        """`sync`, saying which slots are done (host side): refill needs to know which ones."""
        done = self.done.tolist()
        if stop_hit is not None:
            counts = self.count.tolist()
            rows = self.out[:, : max(counts)].tolist()
            hits = [not d and stop_hit(row[:c]) for row, c, d in zip(rows, counts, done, strict=True)]
            if any(hits):
                self.done |= torch.tensor(hits, device=self.done.device)
                done = [d or h for d, h in zip(done, hits, strict=True)]
        return done

    def generated(self) -> list[list[int]]:
        """Each slot's generated ids [B][width], pad after its last token (host side)."""
        return self.out[:, : self.width].tolist()
