"""Refill: finished rows' slots take waiting rows while the batch runs on (NativeEngine._run_refilling).

Each row must generate exactly what it generates in a static batch and alone, token for token, on the CPU in
float32, whatever the slot it lands in and the step it joins at: with per-row max_new_tokens (so that rows end
at different steps and slots free up one by one), stop strings, sampling with per-row seeds, the repetition
penalty and min_new_tokens.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from batchvl.engine.base import GenerationParams
from batchvl.engine.native import NativeEngine

MAX_NEW = 10


def engine(tiny_rows, refill: bool | str, slots: int, **params) -> NativeEngine:
    ck, tokenizer, _ = tiny_rows
    params = GenerationParams(**{"max_new_tokens": MAX_NEW, "eos_token_ids": (tokenizer.eos_token_id,), **params})
    return NativeEngine(ck, tokenizer, params, device="cpu", dtype="float32", max_batch_size=slots, refill=refill)


def requests(tiny_rows):
    """Nine rows of the four kinds (a 7-tile image, two images, a small image, text), with limits from 1 to
    MAX_NEW, so that they finish at different steps."""
    rows = tiny_rows[2]
    limits = [MAX_NEW, 3, 7, 1, 5, 9, 2, MAX_NEW, 4]
    return [dataclasses.replace(rows[i % len(rows)], id=f"row{i}", max_new_tokens=limit)
            for i, limit in enumerate(limits)]


PARAMS = {
    "greedy": {},
    "sampling": {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 11},
    "penalty": {"repetition_penalty": 1.3},
    "min-new-tokens": {"min_new_tokens": 4},
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_refilled_rows_generate_what_static_batches_and_each_row_alone_generate(tiny_rows, name):
    rows = requests(tiny_rows)
    refilled = engine(tiny_rows, refill=True, slots=3, **PARAMS[name])
    calls = []
    real = refilled._admit
    refilled._admit = lambda state, holder, free, waiting, reqs: calls.append(len(free)) or \
        real(state, holder, free, waiting, reqs)
    got = refilled.generate(rows)
    assert len(calls) > 2  # rows joined a running batch, more than once
    static = engine(tiny_rows, refill=False, slots=3, **PARAMS[name])
    want = static.generate(rows)
    # Each row alone too, for greedy decoding (the sampled rows' seeds are per row, so alone is the static
    # batch's case already; the suite's time is better spent elsewhere).
    alone = [static.generate([r])[0] for r in rows] if name == "greedy" else want
    assert [(r.id, r.text, r.output_tokens, r.finish_reason) for r in got] == \
        [(r.id, r.text, r.output_tokens, r.finish_reason) for r in want] == \
        [(r.id, r.text, r.output_tokens, r.finish_reason) for r in alone]
    assert all(r.output_tokens <= row.max_new_tokens for r, row in zip(got, rows, strict=True))
    assert len({r.output_tokens for r in got}) > 2  # rows ended at different steps


def test_stop_strings_end_refilled_rows_where_they_end_static_ones(tiny_rows):
    rows = requests(tiny_rows)
    static = engine(tiny_rows, refill=False, slots=9)
    first = static.generate(rows)
    # A stop string from the middle of one row's text: it ends that row early, freeing its slot.
    longest = max(first, key=lambda r: len(r.text))
    stop = longest.text[len(longest.text) // 2 : len(longest.text) // 2 + 2]
    assert stop.strip()
    want = engine(tiny_rows, refill=False, slots=9, stop=[stop]).generate(rows)
    got = engine(tiny_rows, refill=True, slots=2, stop=[stop]).generate(rows)
    assert [(r.text, r.finish_reason) for r in got] == [(r.text, r.finish_reason) for r in want]
    assert any(r.finish_reason == "stop" for r in got)


def test_a_batch_takes_waiting_rows_only_once_refill_at_of_its_slots_are_free(tiny_rows):
    """engine.refill_at: the share of the slots that must have finished before waiting rows join (a quarter by
    default). A smaller share admits fewer rows at a time, more often; every row runs once and generates the same
    tokens whatever the share."""
    rows = [dataclasses.replace(tiny_rows[2][3], id=f"t{i}", max_new_tokens=2 + (i % 8)) for i in range(16)]
    admissions, tokens = {}, {}
    for refill_at, least in ((0.5, 4), (0.25, 2), (0.125, 1)):
        e = engine(tiny_rows, refill=True, slots=8)
        e.refill_at = refill_at
        admitted = []
        real = e._admit
        e._admit = lambda state, holder, free, waiting, reqs, admitted=admitted, real=real: \
            admitted.append(min(len(free), len(waiting))) or real(state, holder, free, waiting, reqs)
        e.check_every = 1  # the host learns of every finished row at once
        e.generate(rows)
        assert admitted[0] == 8 and sum(admitted) == 16, (refill_at, admitted)
        assert all(n >= least for n in admitted[1:-1]), (refill_at, admitted)  # the last takes what is left
        admissions[refill_at], tokens[refill_at] = len(admitted), e.last_tokens
    assert admissions[0.5] < admissions[0.25] < admissions[0.125], admissions
    assert tokens[0.5] == tokens[0.25] == tokens[0.125]


def test_rows_prefilled_together_into_slots_that_are_not_adjacent_generate_what_they_generate_alone(tiny_rows):
    """One prefill writes each row's keys and values into its own slot (an index of cache rows, not a first
    row): slots 1 and 3 of four, with 0 and 2 left free."""
    caption, two, small, text = tiny_rows[2]
    e = engine(tiny_rows, refill=False, slots=4)
    alone = {}
    for r in (caption, small):
        e.generate([r])
        alone[r.id] = e.last_tokens[0]
    need = max(len(r.prompt_ids) for r in (caption, small)) + MAX_NEW
    with torch.inference_mode():
        state = e.start(4, need)
        state.admit_rows([1, 3], [caption, small], e.vision.compute([caption, small]))
        while not state.sync():
            state.decode()
    got = state.generated()
    assert got[1] == alone[caption.id] and got[3] == alone[small.id]
    assert state.done.tolist() == [True] * 4 and state.requests[0] is None and state.requests[2] is None


def test_the_loop_hands_the_engine_a_batch_and_then_only_the_rows_already_prepared():
    """With refill the engine starts on a batch's worth of rows and takes more only while the prefetcher has
    them ready, up to `most`: on the H200 the first call's wait for four batches' worth of media cost 2 s."""
    from batchvl.core import Request, Result
    from batchvl.run.loop import batches_of

    prepared = 5  # rows 0..4 are ready; the rest would make the caller wait
    taken = []

    def items():
        for i in range(20):
            taken.append(i)
            yield Result.failed(f"e{i}", "x") if i == 1 else Request(f"r{i}", [1], None, [])

    ready = lambda: len(taken) < prepared  # noqa: E731
    first = next(batches_of(items(), 2, 8, ready))
    assert [x.id for x in first] == ["r0", "e1", "r2", "r3", "r4"]  # 2 requests, then what was ready
    plain = (Request(f"p{i}", [1], None, []) for i in range(10))
    assert [len(b) for b in batches_of(plain, 3)] == [3, 3, 3, 1]  # without refill: batches of `size`
    prepared = 100
    assert [len(b) for b in batches_of(items(), 2, 8, ready)] == [9, 8, 3]  # never more than `most` requests


def test_refill_auto_runs_static_batches_only_where_every_row_runs_to_one_length(tiny_rows):
    """engine.refill: auto (the default) refills, unless nothing can end a row before a limit all rows share
    (ignore_eos, no stop, one max_new_tokens): such a batch's rows end on one step and there is nothing to refill."""
    text = tiny_rows[2][3]
    rows = [dataclasses.replace(text, id=f"t{i}", max_new_tokens=2 + i % 3) for i in range(5)]
    same = [dataclasses.replace(r, max_new_tokens=None) for r in rows]
    stop_ids = (tiny_rows[1].convert_tokens_to_ids("<|im_end|>"),)
    e = engine(tiny_rows, refill="auto", slots=3)
    ran = []
    real = e._run_refilling
    e._run_refilling = lambda reqs: ran.append(len(reqs)) or real(reqs)
    base = dict(max_new_tokens=4, eos_token_ids=(tiny_rows[1].eos_token_id,))
    cases = [  # rows, params, refills
        (rows, {"ignore_eos": True}, True),  # per-row limits
        (same, {"ignore_eos": True}, False),
        (same, {"ignore_eos": True, "stop": ("x",)}, True),
        (same, {"ignore_eos": True, "stop_token_ids": stop_ids}, True),
        (same, {}, True),  # the end token ends rows
    ]
    for batch, params, refills in cases:
        e.set_params(GenerationParams(**base, **params))
        ran.clear()
        got = e.generate(batch)
        assert bool(ran) == refills and len(got) == len(batch), params
    want = engine(tiny_rows, refill=False, slots=3, **base).generate(same)  # the last case, refilled: the same
    assert [(r.text, r.output_tokens) for r in got] == [(r.text, r.output_tokens) for r in want]
    e.set_params(GenerationParams(**base, ignore_eos=True))
    e.arrivals = lambda n, fits: []  # a server's: requests may join
    assert e._refills(same)


def test_the_loop_hands_a_refilling_engine_several_batches_of_rows_as_auto_decides(tiny_rows, tmp_path):
    from batchvl.config.load import job_from_mapping
    from batchvl.run.loop import engine_rows, refills

    (tmp_path / "rows.jsonl").write_text('{"id": "a", "prompt": "hi", "limit": 3}\n')
    cases = [  # generation, input, engine, refills
        ({}, {}, {}, True),
        ({"ignore_eos": True}, {}, {}, False),
        ({"ignore_eos": True, "stop": ["."]}, {}, {}, True),
        ({"ignore_eos": True, "stop_token_ids": [7]}, {}, {}, True),
        ({"ignore_eos": True}, {"max_new_tokens_column": "limit"}, {}, True),
        ({"ignore_eos": True}, {}, {"refill": True}, True),
        ({}, {}, {"refill": False}, False),
        ({}, {}, {"backend": "transformers"}, False),
    ]
    for generation, inputs, eng, want in cases:
        spec = {"model": str(tiny_rows[0].path), "input": {"path": "rows.jsonl", "prompt_column": "prompt", **inputs},
                "output": {"path": "out"}, "generation": generation, "engine": {"max_batch_size": 8, **eng}}
        job = job_from_mapping(spec, tmp_path)
        assert refills(job) == want, (generation, inputs, eng)
        assert engine_rows(job) == (32 if want else 8)
