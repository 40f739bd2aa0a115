"""engine.vision_ahead: the run loop hands the native engine its next batch before the current one runs, and
that batch's vision pass is computed then (on a second CUDA stream on a GPU; in place on the CPU). What a
batch finds ahead must be exactly what it would have computed, and a batch found ahead must not be computed
again. The tiny checkpoint on the CPU in float32; token ids compared exactly."""

from __future__ import annotations

import pyarrow.parquet as pq

from batchvl.cli import main
from batchvl.engine.base import GenerationParams
from batchvl.engine.native import NativeEngine
from batchvl.engine.vision import VisionRunner
from batchvl.run.loop import with_next
from tests.conftest import base_job, write_job, write_jsonl

MAX_NEW = 6


def make_engine(tiny_rows, ahead: bool, slots: int = 4) -> NativeEngine:
    ck, tokenizer, _ = tiny_rows
    params = GenerationParams(max_new_tokens=MAX_NEW, eos_token_ids=(tokenizer.eos_token_id,))
    return NativeEngine(ck, tokenizer, params, device="cpu", dtype="float32", max_batch_size=slots,
                        vision_ahead=ahead)


def counting(engine: NativeEngine) -> list[list[str]]:
    """The ids of each vision pass `engine` computes from now on."""
    passes = []
    real = engine.vision.compute
    engine.vision.compute = lambda requests: passes.append([r.id for r in requests]) or real(requests)
    return passes


def ids(requests) -> list[str]:
    return [r.id for r in requests]


def test_a_batch_found_ahead_generates_what_it_generates_without_and_is_not_computed_again(tiny_rows):
    caption, two, small, text = tiny_rows[2]
    first, second = [caption, text], [two, small]
    e = make_engine(tiny_rows, ahead=True)
    passes = counting(e)
    want = e.generate(second)  # nothing ahead: computed in the call
    e.vision_ahead(second)
    e.generate(first)  # another batch runs meanwhile, its own features computed
    assert passes == [ids(second), ids(second), ids(first)]
    assert e.generate(second) == want and len(passes) == 3  # taken from ahead, not computed again
    e.generate(second)  # spent: a second call computes its own
    assert len(passes) == 4
    e.vision_ahead([caption, two, small])
    assert e.generate([small, caption]) == [want[1], e.generate([caption])[0]]  # not a run in order: computed
    assert passes[-2:] == [ids([small, caption]), ids([caption])]


def test_a_batch_cut_in_pieces_takes_each_piece_from_ahead(tiny_rows):
    caption, two, small, text = tiny_rows[2]
    rows = [caption, two, text, small]
    e = make_engine(tiny_rows, ahead=True, slots=2)  # generate cuts the batch into batches of two rows
    passes = counting(e)
    want = e.generate(rows)
    e.vision_ahead(rows)
    assert e.generate(rows) == want and passes == [ids(rows[:2]), ids(rows[2:]), ids(rows)]


def test_running_out_of_memory_drops_what_was_found_ahead(tiny_rows):
    caption, two, small, text = tiny_rows[2]
    e = make_engine(tiny_rows, ahead=True)
    passes = counting(e)
    e.vision_ahead([caption, two])
    e.out_of_memory(4)
    e.generate([caption, two])
    assert passes == [ids([caption, two])] * 2


def test_with_next_pairs_each_item_with_the_one_after_it():
    assert list(with_next(iter([1, 2, 3]))) == [(1, 2), (2, 3), (3, None)]
    assert list(with_next([])) == []


def test_a_job_with_vision_ahead_writes_what_it_writes_without(tiny_model, images, tmp_path, monkeypatch):
    """The run loop takes each batch before the one before it runs; error rows ride along in their batch."""
    asked = []
    real = VisionRunner.ahead
    monkeypatch.setattr(VisionRunner, "ahead", lambda self, requests: asked.append(ids(requests)) or
                        real(self, requests))
    rows = [{"id": f"r{i}", "prompt": "<image>\nDescribe.", "image": str(images[name])}
            for i, name in enumerate(["wide.jpg", "tall.png", "tiny.png"] * 2)]
    rows.insert(3, {"id": "missing", "prompt": "<image>\nDescribe.", "image": str(tmp_path / "nope.jpg")})
    rows.append({"id": "text", "prompt": "Say hi", "image": None})
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    texts = {}
    for ahead in (False, True):
        out = tmp_path / f"out-{ahead}"
        job = base_job(tiny_model, src, out, generation={"max_new_tokens": MAX_NEW},
                       engine={"backend": "native", "max_batch_size": 2, "vision_ahead": ahead})
        assert main(["run", str(write_job(tmp_path / f"job-{ahead}.yaml", job))]) == 0
        table = pq.read_table(out).to_pylist()
        texts[ahead] = {r["id"]: (r["text"], r["error"]) for r in table}
    assert asked == [["r2", "r3"], ["r4", "r5"], ["text"]]  # 7 requests in batches of 2; the first runs as it is
    assert texts[True] == texts[False]
    assert len(texts[True]) == len(rows) and texts[True]["missing"][1] and not texts[True]["r0"][1]
