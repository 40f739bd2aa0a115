"""The engine hooks a server and the streaming Python API stand on (Engine.on_tokens, Engine.arrivals), TextStream,
and the pipeline's stream_infer and chat."""

from __future__ import annotations

import dataclasses

import pytest

from batchvl import BackendConfig, GenerationConfig, Session, pipeline
from batchvl.engine.base import GenerationParams
from batchvl.engine.hf import TransformersEngine
from batchvl.engine.native import NativeEngine
from batchvl.engine.stream import TextStream

from .conftest import random_image

MAX_NEW = 20


def native(tiny_rows, refill: bool, **params) -> NativeEngine:
    ck, tokenizer, _ = tiny_rows
    params = GenerationParams(**{"max_new_tokens": MAX_NEW, "eos_token_ids": (tokenizer.eos_token_id,), **params})
    return NativeEngine(ck, tokenizer, params, device="cpu", dtype="float32", max_batch_size=4, refill=refill)


def told(engine) -> dict[str, list[list[int]]]:
    seen: dict[str, list[list[int]]] = {}
    engine.on_tokens = lambda request, ids: seen.setdefault(request.id, []).append(list(ids))
    return seen


@pytest.mark.parametrize("refill", [False, True])
def test_native_engine_tells_each_rows_tokens_as_they_grow(tiny_rows, refill):
    rows = [dataclasses.replace(r, id=f"r{i}", max_new_tokens=MAX_NEW) for i, r in enumerate(tiny_rows[2][1:])]
    e = native(tiny_rows, refill, ignore_eos=True)
    seen = told(e)
    e.generate(rows)
    for i, r in enumerate(rows):
        steps = seen[r.id]
        assert len(steps) >= 2  # 20 tokens, told every 8 decode steps
        assert all(len(a) < len(b) and b[: len(a)] == a for a, b in zip(steps, steps[1:], strict=False))
        assert steps[-1] == e.last_tokens[i][: len(steps[-1])]


def test_transformers_engine_tells_each_rows_tokens_at_the_end(tiny_rows):
    ck, tokenizer, rows = tiny_rows
    params = GenerationParams(max_new_tokens=6, eos_token_ids=(tokenizer.eos_token_id,))
    e = TransformersEngine(ck, tokenizer, params, device="cpu", dtype="float32")
    seen = told(e)
    results = e.generate(rows[2:])
    assert [len(seen[r.id]) for r in rows[2:]] == [1, 1]
    assert [len(seen[r.id][0]) >= res.output_tokens for r, res in zip(rows[2:], results, strict=True)] == [True] * 2


def test_rows_that_arrive_join_a_running_batch_and_generate_what_they_generate_alone(tiny_rows):
    small, text = tiny_rows[2][2:]
    rows = [dataclasses.replace(small, id="r0", max_new_tokens=3), dataclasses.replace(text, id="r1",
                                                                                       max_new_tokens=18)]
    late = [dataclasses.replace(text, id="late0", max_new_tokens=5), dataclasses.replace(small, id="late1",
                                                                                         max_new_tokens=4)]
    every = {r.id: r for r in rows + late}
    e = native(tiny_rows, refill=True)
    asked = []

    def arrivals(n, fits):
        asked.append(n)
        take = [r for r in late if fits(r)][:n]
        for r in take:
            late.remove(r)
        return take

    e.arrivals = arrivals
    results = e.generate(rows)
    e.arrivals = None
    assert asked and [r.id for r in results] == ["r0", "r1", "late0", "late1"]  # joined while r1 ran
    alone = native(tiny_rows, refill=False)
    for result in results:
        want = alone.generate([every[result.id]])[0]
        assert (result.text, result.output_tokens) == (want.text, want.output_tokens), result.id


class Tokens:
    """A tokenizer whose tokens are characters: `decode` joins them, skipping the special id 0."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def test_text_stream_hands_out_pieces_that_join_to_the_final_text():
    params = GenerationParams(max_new_tokens=50, eos_token_ids=(0,), stop=("STOP",))
    stream = TextStream(Tokens(), params)
    text = "hello STOP world"
    ids = [ord(c) for c in text]
    pieces = [stream.update(ids[:n]) for n in range(1, len(ids) + 1)]
    assert "".join(pieces) == "hello "  # nothing of the stop string, nothing after it
    assert all("S" not in p for p in pieces)
    assert stream.finish("hello ") == ""
    stream = TextStream(Tokens(), dataclasses.replace(params, stop=()))
    assert stream.update([ord("a"), 0, ord("b")]) == "a"  # the stop token ends the text
    assert stream.update([ord("a"), 0, ord("b"), ord("c")]) == ""
    assert stream.finish("a") == ""


def test_text_stream_holds_back_an_incomplete_character():
    class Bytes(Tokens):
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes(), GenerationParams(max_new_tokens=10, eos_token_ids=(0,)))
    euro = list("€".encode())
    assert stream.update([ord("x"), *euro[:2]]) == "x"
    assert stream.update([ord("x"), *euro]) == "€"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    p = pipeline(str(tiny_model), backend_config=BackendConfig(device="cpu", dtype="float32", max_batch_size=2))
    yield p
    p.close()


def test_stream_infer_pieces_join_to_the_text_of_a_call(pipe, tmp_path):
    image = random_image(300, 200, seed=4)
    prompts = ["tell me a story", ("describe it", image), "and another"]
    config = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    whole = pipe(prompts, gen_config=config)
    pieces = list(pipe.stream_infer(prompts, gen_config=config))
    for i, response in enumerate(whole):
        mine = [p for p in pieces if p.index == i]
        assert "".join(p.text for p in mine) == response.text
        assert [p.finish_reason for p in mine][-1] == response.finish_reason and len(mine) >= 3
        assert all(p.finish_reason is None for p in mine[:-1])
        assert mine[-1].generate_token_len == response.generate_token_len
        assert all(p.input_token_len == response.input_token_len for p in mine)


def test_leaving_a_stream_early_leaves_the_pipeline_usable(pipe):
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    for _ in pipe.stream_infer(["a", "b", "c", "d", "e"], gen_config=config):
        break
    assert pipe("a", gen_config=config).finish_reason == "length"


def test_chat_keeps_the_conversation_in_the_session(pipe):
    config = GenerationConfig(max_new_tokens=4)
    session = pipe.chat("hi", gen_config=config)
    assert isinstance(session, Session) and session.response.text == session.history[0][1]
    again = pipe.chat("and then?", session=session, gen_config=config)
    assert again is session and [p for p, _ in session.history] == ["hi", "and then?"]
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": session.history[0][1]},
                    {"role": "user", "content": "and then?"}]
    assert pipe(conversation, gen_config=config).text == session.response.text
