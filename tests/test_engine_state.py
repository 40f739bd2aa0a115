"""The native engine's batch state: slots are independent, so a row admitted into a running batch (the
refill of finished slots builds on it) generates exactly what it generates alone, and a finished slot changes
nothing for the others. Plus the pure parts of the CUDA-graph and cache policies, which run on the CPU.

Engine cases run the tiny checkpoint on the CPU in float32 and compare token ids exactly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from batchvl.core import Request
from batchvl.engine.base import GenerationParams
from batchvl.engine.graphs import DecodeGraphs, batch_buckets, bucket_for
from batchvl.engine.model_runner import SPAN_BUCKET, batch_span, prefill_chunks
from batchvl.engine.native import NativeEngine
from batchvl.engine.sampler import Sampler

MAX_NEW = 12
SLOTS = 4


def make_engine(tiny_rows, **params) -> NativeEngine:
    ck, tokenizer, _ = tiny_rows
    params = GenerationParams(**{"max_new_tokens": MAX_NEW, "eos_token_ids": (tokenizer.eos_token_id,), **params})
    return NativeEngine(ck, tokenizer, params, device="cpu", dtype="float32", max_batch_size=SLOTS)


def alone(engine: NativeEngine, request: Request) -> list[int]:
    """The ids `request` generates in a batch of its own."""
    engine.generate([request])
    return engine.last_tokens[0]


def alone_state(engine: NativeEngine, request: Request):
    """The state of a batch of `request` alone, run to the end."""
    state = start(engine, [request], [request])
    until_done(state)
    return state


def fields(state, slot: int) -> tuple:
    """What a slot holds apart from its cache row: position, count, done, seed, seen tokens."""
    seen = None if state.seen is None else state.seen[slot].nonzero().flatten().tolist()
    return (int(state.positions[slot]), int(state.count[slot]), bool(state.done[slot]), int(state.seeds[slot]), seen)


def need(requests: list[Request]) -> int:
    return max(len(r.prompt_ids) for r in requests) + MAX_NEW


def until_done(state) -> None:
    with torch.inference_mode():
        while not state.sync():
            state.decode()


def decode(state, steps: int) -> None:
    with torch.inference_mode():
        for _ in range(steps):
            state.decode()


def admit(engine: NativeEngine, state, slot: int, request: Request) -> None:
    with torch.inference_mode():
        state.admit(slot, request, engine.vision.compute([request]))


def start(engine: NativeEngine, first: list[Request], everyone: list[Request]):
    """A state of SLOTS slots, spanning every row of `everyone`, with `first` in its first slots."""
    with torch.inference_mode():
        state = engine.start(SLOTS, need(everyone))
        state.fill(first, engine.vision.compute(first))
    return state


def early_token(tiny_rows, request: Request) -> int:
    """A token `request` generates (greedy) early on, not its first: as an EOS id, min_new_tokens decides
    whether the row stops there."""
    return alone(make_engine(tiny_rows), request)[1]


PARAMS = {
    "greedy": {},
    "sampling": {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 11},
    "repetition-penalty": {"repetition_penalty": 1.3},
    "penalty-sampling": {"repetition_penalty": 1.3, "temperature": 1.0, "seed": 5},
}


@pytest.mark.parametrize("name", [*PARAMS, "min-new-tokens"])
def test_a_row_admitted_into_a_running_batch_generates_what_it_generates_alone(tiny_rows, name):
    _, _, rows = tiny_rows
    caption, two, small, text = rows
    short = dataclasses.replace(text, id="short", max_new_tokens=2)  # slot 1 finishes after two tokens
    again = dataclasses.replace(caption, id="again")  # another id: another seed
    if name == "min-new-tokens":
        # Each row's EOS is its own second greedy token. `again` joins at batch step 6: with a batch-wide
        # step, min_new_tokens would no longer hold its EOS back and it would stop after two tokens.
        params = {"eos_token_ids": (early_token(tiny_rows, two), early_token(tiny_rows, again)), "min_new_tokens": 5}
    else:
        params = PARAMS[name]
    engine = make_engine(tiny_rows, **params)
    want = {r.id: alone(engine, r) for r in (caption, short, small, two, again)}

    state = start(engine, [caption, short, small], rows)  # slot 3 is free
    decode(state, 3)
    admit(engine, state, 3, two)  # into a slot never used
    decode(state, 3)
    assert state.generated()[1] == want["short"]  # done since step 1
    admit(engine, state, 1, again)  # into a slot whose row finished
    until_done(state)
    got = state.generated()
    assert got == [want["caption-7tile"], want["again"], want["small"], want["two-images"]]
    # Admitting reset every field of the slot: nothing of the row that finished there is left.
    assert fields(state, 1) == fields(alone_state(engine, again), 0)
    assert fields(state, 3) == fields(alone_state(engine, two), 0)
    if name == "min-new-tokens":
        assert min(state.count.tolist()) >= 5


def test_a_finished_slot_stays_in_bounds_and_leaves_the_others_alone(tiny_rows):
    _, _, rows = tiny_rows
    caption, two, small, text = rows
    short = dataclasses.replace(text, id="short", max_new_tokens=2)
    engine = make_engine(tiny_rows)
    batch = [caption, short, two, small]
    state = start(engine, batch, batch)
    until_done(state)
    got = state.generated()
    assert got == [alone(engine, r) for r in batch]
    assert got[1][2:] == [engine.pad_id] * (MAX_NEW - 2)
    assert state.count.tolist() == [MAX_NEW, 2, MAX_NEW, MAX_NEW]
    lengths = [len(r.prompt_ids) for r in batch]
    # Each slot's newest token went to position length + count - 1; a done slot moves no further.
    assert state.positions.tolist() == [n + c - 1 for n, c in zip(lengths, state.count.tolist(), strict=True)]
    assert max(state.positions.tolist()) < state.span <= state.cache.positions
    decode(state, 5)  # steps past the end change nothing
    assert state.generated() == got and state.positions.tolist()[1] == lengths[1] + 1


def test_admit_refuses_a_row_longer_than_the_span(tiny_rows):
    _, _, rows = tiny_rows
    text = rows[3]
    engine = make_engine(tiny_rows)
    state = start(engine, [text], [text])
    with pytest.raises(ValueError, match="do not fit a span"):
        admit(engine, state, 1, dataclasses.replace(text, prompt_ids=text.prompt_ids * 4))


def test_sampler_steps_per_row_draw_what_each_row_draws_alone():
    vocab, block = 64, torch.tensor([7])
    sampler = Sampler(GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.95, min_new_tokens=3), vocab)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    logits[:, 7] = 50.0  # token 7 wins whenever it is not blocked
    seeds = torch.tensor([1, 2, 3])
    steps = torch.tensor([0, 5, 2])
    batch = sampler(logits, None, seeds, steps, block)
    each = [int(sampler(logits[i : i + 1], None, seeds[i : i + 1], int(steps[i]), block)) for i in range(3)]
    assert batch.tolist() == each
    assert [t == 7 for t in each] == [False, True, False]  # blocked below min_new_tokens only
    same = sampler(logits, None, seeds, torch.tensor([4, 4, 4]), block)
    assert same.tolist() == sampler(logits, None, seeds, 4, block).tolist()


def test_batch_buckets_are_powers_of_two_then_the_largest_batch():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    buckets = batch_buckets(48)
    for rows in range(1, 49):
        size = bucket_for(rows, buckets)
        assert rows <= size < 2 * rows or size == 48
    assert [bucket_for(n, buckets) for n in (1, 3, 5, 17, 33, 48)] == [1, 4, 8, 32, 48, 48]
    with pytest.raises(ValueError):
        bucket_for(49, buckets)
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_batch_span_rounds_up_and_stops_at_the_context_unless_rows_need_more():
    assert batch_span(1, 4096) == SPAN_BUCKET
    assert batch_span(SPAN_BUCKET + 1, 4096) == 2 * SPAN_BUCKET
    assert batch_span(4000, 4000) == 4000  # not rounded past the rotary tables
    assert batch_span(5000, 4000) == 5000


def test_prefill_chunks_fit_the_budget_at_their_own_longest_prompt():
    assert prefill_chunks([10, 10, 20, 30, 30, 90], 60) == [(0, 3, 20), (3, 5, 30), (5, 6, 90)]
    assert prefill_chunks([100], 60) == [(0, 1, 100)]  # one row a chunk, whatever its length
    assert prefill_chunks([50, 10, 10], 100) == [(0, 2, 50), (2, 3, 10)]  # in the order given
    assert prefill_chunks([], 60) == []
    assert prefill_chunks([10, 10, 10, 10, 10], 1000, max_rows=2) == [(0, 2, 10), (2, 4, 10), (4, 5, 10)]


def test_a_batch_runs_its_rows_by_length_each_prefill_chunk_cut_to_its_own_longest(tiny_rows):
    """The rows take the slots shortest first and prefill in chunks padded to their own longest prompt (no wider,
    however long the batch's longest); each row generates what it generates alone, and the results and first-step
    logits come back in request order."""
    _, _, rows = tiny_rows
    order = [rows[0], rows[3], rows[1], rows[2]]  # the 7-tile caption (longest) first, the text row (shortest)
    lengths = [len(r.prompt_ids) for r in order]
    engine = make_engine(tiny_rows)
    engine.prefill_tokens = 2 * sorted(lengths)[1]  # the two shortest rows fit a chunk together, no more
    want = {}
    for r in order:
        engine.first_step_logits = []
        want[r.id] = (alone(engine, r), engine.first_step_logits[0][0])
    chunks = []
    prefill = engine.model.lm.prefill
    def spy(x, lengths, cache, rows=0, host_lengths=None):
        chunks.append((x.shape[1], host_lengths))
        return prefill(x, lengths, cache, rows, host_lengths)

    engine.model.lm.prefill = spy
    engine.first_step_logits = []
    results = engine.generate(order)
    assert [r.id for r in results] == [r.id for r in order]
    assert engine.last_tokens == [want[r.id][0] for r in order]
    for got, r in zip(engine.first_step_logits[0], order, strict=True):
        torch.testing.assert_close(got, want[r.id][1], rtol=1e-5, atol=1e-5)
    assert [c[1] for c in chunks][0] == sorted(lengths)[:2]  # shortest first, the two together
    assert sum(len(c[1]) for c in chunks) == 4 and [h for c in chunks for h in c[1]] == sorted(lengths)
    assert all(width == max(host) for width, host in chunks)  # each chunk cut to its own longest prompt


def test_a_prefill_chunk_of_one_row_runs_as_two_copies_where_the_model_is_compiled(tiny_rows):
    """ModelRunner.min_rows = 2 (a compiled model, which would compile again for a batch of one): a row alone runs
    twice in one prefill, writing the same cache row, and generates what it does with min_rows 1, whether it
    fills a batch (a slice of cache rows) or is admitted into a running one (an index tensor)."""
    _, _, rows = tiny_rows
    caption, two, small, text = rows
    engine = make_engine(tiny_rows)
    want = {r.id: alone(engine, r) for r in (caption, small, text)}
    state = start(engine, [caption, two], rows)
    decode(state, 2)
    admit(engine, state, 3, small)
    until_done(state)
    want_admitted = state.generated()[3]

    engine.runner.min_rows = 2
    widths = []
    prefill = engine.model.lm.prefill
    def spy(x, lengths, cache, rows=0, host_lengths=None):
        widths.append(x.shape[0])
        return prefill(x, lengths, cache, rows, host_lengths)

    engine.model.lm.prefill = spy
    assert {r.id: alone(engine, r) for r in (caption, small, text)} == want
    assert widths == [2, 2, 2]
    state = start(engine, [caption, two], rows)
    decode(state, 2)
    admit(engine, state, 3, small)
    until_done(state)
    assert state.generated()[3] == want_admitted and widths[-2:] == [2, 2]  # the batch's two rows, then small's two


def test_cache_keeps_max_batch_size_slots_and_its_span_only_grows(tiny_rows):
    runner = make_engine(tiny_rows).runner
    cache, span = runner.reserve(2, 100)
    assert (cache.batch, cache.positions, span) == (SLOTS, SPAN_BUCKET, SPAN_BUCKET)
    grown, span = runner.reserve(3, 300)
    assert (grown.batch, grown.positions, span) == (SLOTS, 2 * SPAN_BUCKET, 2 * SPAN_BUCKET)
    same, span = runner.reserve(4, 100)
    assert same is grown and span == SPAN_BUCKET  # eager decode attends over the batch's own span
    # A budget of 2048 tokens holds 2 slots of 1024 positions; a batch of 3 short rows then starts over.
    runner.max_batch_tokens = 2048
    cache, _ = runner.reserve(1, 1000)
    assert (cache.batch, cache.positions) == (2, 1024)
    cache, _ = runner.reserve(3, 200)
    assert (cache.batch, cache.positions) == (SLOTS, SPAN_BUCKET)


def test_rows_padded_up_to_a_graph_bucket_leave_the_real_rows_alone(tiny_rows):
    """What a decode graph does with a batch smaller than its bucket: the padding rows (token 0, position 0,
    in cache rows no slot uses) change neither the real rows' logits nor their cache rows."""
    _, _, rows = tiny_rows
    engine = make_engine(tiny_rows)
    with torch.inference_mode():
        state = engine.start(3, need(rows))  # 3 slots in a cache of SLOTS rows
        state.fill(rows[:3], engine.vision.compute(rows[:3]))
        cache, lm = state.cache, engine.model.lm
        k, v = cache.k.clone(), cache.v.clone()
        plain = lm.logits(lm.decode(lm.embed(state.tokens)[:, None], state.positions, cache, state.span))  # [3, V]
        written = cache.k[:, :3].clone(), cache.v[:, :3].clone()
        cache.k.copy_(k)
        cache.v.copy_(v)
        pad = torch.zeros(SLOTS - 3, dtype=torch.long)
        tokens, positions = torch.cat([state.tokens, pad]), torch.cat([state.positions, pad])  # [SLOTS]
        padded = lm.logits(lm.decode(lm.embed(tokens)[:, None], positions, cache, state.span))
    torch.testing.assert_close(padded[:3], plain, rtol=1e-5, atol=1e-5)
    assert padded[:3].argmax(-1).tolist() == plain.argmax(-1).tolist()
    torch.testing.assert_close((cache.k[:, :3], cache.v[:, :3]), written, rtol=1e-5, atol=1e-5)


class _ReplayGraphs(DecodeGraphs):
    """Decode graphs as the step graph sees them, on the CPU: `capture_step` keeps the step and `replay` runs it
    (a CUDA graph replays what was captured); `step` is the model's eager call, as a decode-graph replay computes.
    The state tensors and the whole-step cache are DecodeGraphs' own."""

    def __init__(self, runner, span: int, fail: bool = False):  # not super().__init__: it captures on CUDA
        self.runner, self.span, self.buckets, self.fail, self.captured = runner, span, [1, 2, 4], fail, 0
        self.cache = runner.cache
        self._states, self._steps = {}, {}

    def capture_step(self, step):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1
        return type("Graph", (), {"replay": staticmethod(step)})()

    def step(self, token, positions):
        return self.runner.decode(token, positions, self.cache, self.span, eager=True)


def test_a_whole_step_graph_replays_what_the_step_does_and_a_failed_capture_falls_back(tiny_rows, caplog):
    """engine.step_graph's control flow (the capture itself needs a GPU): captured once, at the first batch's
    first step, then replayed by that batch and the next, whose state is the same tensors reset; new generation
    settings (another sampler) capture it again; a capture that fails leaves the step as it was, with one
    warning."""
    rows = tiny_rows[2][1:]  # not the 7-tile row: its vision pass is the slow part on the CPU
    e = make_engine(tiny_rows)
    e.generate(rows)
    want = e.last_tokens
    e.step_graph = True
    for fail in (False, True):
        with torch.inference_mode():
            state = e.start(SLOTS, need(rows))
            graphs = e.runner.graphs = _ReplayGraphs(e.runner, state.span, fail)
            features = e.vision.compute(rows)
            for batch in range(3):
                if batch == 2:
                    e.set_params(e.params)  # the same settings, but a new sampler and stop tensors
                state = e.start(SLOTS, need(rows))  # now over the "graphs"
                state.fill(rows, features)
                until_done(state)
                assert state.generated()[: len(rows)] == want, batch
        e.runner.graphs = None
        assert graphs.captured == (0 if fail else 2)
        assert ("could not be captured" in caplog.text) == fail


def test_a_whole_step_graph_keeps_refills_tokens(tiny_rows):
    """With refill, rows are admitted into the step graph's slots (its tensors, written through index tensors)
    while the others decode: the replayed step must give each row what refill gives it without the graph."""
    rows = tiny_rows[2][2:]  # the small image and the text row: cheap on the CPU
    # More rows than slots, with limits that free the slots at different steps: rows are admitted into scattered
    # slots (written through index tensors) as well as adjacent ones.
    limits = iter([3, 12, 5, 12, 7, 9])
    requests = [dataclasses.replace(r, id=f"{r.id}-{i}", max_new_tokens=next(limits)) for i in range(3) for r in rows]
    e = make_engine(tiny_rows)
    e.refill = True
    e.generate(requests)
    want = e.last_tokens
    e.step_graph = True
    with torch.inference_mode():
        state = e.start(SLOTS, need(requests))
    graphs = e.runner.graphs = _ReplayGraphs(e.runner, state.span)
    try:
        e.generate(requests)
    finally:
        e.runner.graphs = None
    assert e.last_tokens == want
    assert graphs.captured == 1


def test_stage_times_sum_each_stage_and_list_its_entries_where_asked(monkeypatch):
    from batchvl.engine.timing import StageTimes

    times = StageTimes()
    with times.stage("vision"):
        pass
    assert set(times.seconds) == {"vision"} and times.entries is None  # nothing listed unless asked
    entries = []
    monkeypatch.setattr(StageTimes, "entries", entries)  # as stage_trace.py asks it, for every instance
    for name in ("vision", "prefill", "vision"):
        with times.stage(name):
            pass
    assert [e[0] for e in entries] == ["vision", "prefill", "vision"]
    assert entries[0][1] <= entries[1][1] <= entries[2][1]  # in order, on one clock
    assert times.seconds["vision"] >= entries[0][2] + entries[2][2]


def test_the_media_wait_does_not_synchronise_the_device_where_engine_stages_do(monkeypatch):
    """With sync (bench), every engine stage's ends synchronise the device; the loop's media wait, once per row and
    queueing no device work, does not: each synchronisation lets the GIL go to the preparation threads."""
    from batchvl.engine.timing import StageTimes
    from batchvl.run.loop import _timed

    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    times = StageTimes(sync=True)
    assert list(_timed(range(5), times, "media wait")) == list(range(5))
    assert syncs == [] and "media wait" in times.seconds
    with times.stage("vision"):
        pass
    assert len(syncs) == 2
    times.sync = False
    with times.stage("vision"):
        pass
    assert len(syncs) == 2
