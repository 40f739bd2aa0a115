"""`batchvl serve` through OpenAI's own Python client and plain HTTP: chat with images, streamed and not, gives the
text `batchvl run` gives on the same rows; every bad request gets OpenAI's error body and the right status and
harms no other request; 200 requests from 32 clients are each answered once; the metrics count them.

One server (the tiny model, native engine with refill, in a thread of this process) serves the module."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from pathlib import Path

import httpx
import openai
import pyarrow.parquet as pq
import pytest

from batchvl.cli import main

from .conftest import base_job, random_image, write_job, write_jsonl
from .media_server import MediaServer, Route
from .serve_util import API_KEY, SMALL_LIMITS, start

TOKENS = 8  # max_tokens of the comparisons
MODEL = "tiny-internvl"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve-media")
    random_image(900, 500, seed=1).save(folder / "wide.jpg", quality=95)
    random_image(300, 700, seed=2).save(folder / "tall.png")
    random_image(60, 40, seed=3).save(folder / "small.png")
    return folder


@pytest.fixture(scope="module")
def web(media):
    """The media server (loopback: the server runs with --allow-private-media)."""
    s = MediaServer()
    base = s.start()
    for f in media.iterdir():
        s.routes[f"/{f.name}"] = Route(body=f.read_bytes())
    s.routes["/slow.png"] = Route(body=(media / "small.png").read_bytes(), gate=threading.Event())
    yield s, base
    s.routes["/slow.png"].gate.set()
    s.stop()


@pytest.fixture(scope="module")
def served(tiny_model, media, tmp_path_factory, web):
    running = start(tiny_model, tmp_path_factory.mktemp("serve-state"), media,
                    ["engine.refill=true", "generation.max_new_tokens=16"], max_waiting=32, limits=SMALL_LIMITS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def conversations(media: Path, web_base: str) -> dict[str, list[dict]]:
    """Chat rows by id: an http image, a data URI, a file:// image, two images in one message, text only, and
    a multi-turn conversation."""
    text = {"type": "text", "text": "describe the picture"}
    return {
        "http": [{"role": "user", "content": [text, image(f"{web_base}/wide.jpg")]}],
        "data": [{"role": "user", "content": [image(data_uri(media / "tall.png")), text]}],
        "file": [{"role": "user", "content": [text, image(f"file://{media / 'small.png'}")]}],
        "two": [{"role": "user", "content": [
            {"type": "text", "text": "compare <image> and <image>"}, image(f"{web_base}/small.png"),
            image(f"file://{media / 'wide.jpg'}")]}],
        "text": [{"role": "user", "content": "hello, who are you?"}],
        "turns": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}],
    }


@pytest.fixture(scope="module")
def run_rows(tiny_model, media, web, tmp_path_factory) -> dict[str, dict]:
    """`batchvl run` over the same conversations, greedy, the server's engine settings: output rows by id."""
    folder = tmp_path_factory.mktemp("serve-run")
    rows = [{"id": k, "messages": m} for k, m in conversations(media, web[1]).items()]
    job = base_job(tiny_model, write_jsonl(folder / "rows.jsonl", rows), folder / "out",
                   input={"messages_column": "messages", "prompt_column": None, "image_column": None},
                   engine={"backend": "native", "max_batch_size": 4, "refill": True},
                   generation={"max_new_tokens": TOKENS})
    write_job(folder / "job.yaml", job)
    assert main(["run", str(folder / "job.yaml"), "--quiet"]) == 0
    return {r["id"]: r for r in pq.read_table(folder / "out").to_pylist()}


def test_chat_with_images_gives_the_text_of_batchvl_run(client, media, web, run_rows):
    chats = conversations(media, web[1])
    answers: dict[str, object] = {}

    def ask(key: str) -> None:  # all at once: they share the engine's batches
        answers[key] = client.chat.completions.create(model=MODEL, messages=chats[key], max_tokens=TOKENS,
                                                      temperature=0)

    threads = [threading.Thread(target=ask, args=(k,)) for k in chats]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, row in run_rows.items():
        got = answers[key]
        assert row["error"] is None
        assert got.choices[0].message.content == row["text"], key
        assert got.choices[0].finish_reason == row["finish_reason"]
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (row["prompt_tokens"], row["output_tokens"])
        assert got.usage.total_tokens == row["prompt_tokens"] + row["output_tokens"]


def test_media_in_a_worker_process_gives_the_same_answers_and_the_process_ends_with_the_server(
        tiny_model, media, web, run_rows, tmp_path):
    """`media.prepare_processes` (auto on a GPU) in the server: its images are decoded and tiled in a worker
    process, the answers are `batchvl run`'s, and stopping the server stops the worker."""
    from .test_media_processes import children, gone_soon

    def workers() -> set[int]:
        return {p for p in children(os.getpid()) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()}

    before = workers()
    running = start(tiny_model, tmp_path / "state", media, ["engine.refill=true", "generation.max_new_tokens=16",
                                                            "media.prepare_processes=1"], limits=SMALL_LIMITS)
    try:
        spawned = workers() - before
        assert len(spawned) == 1
        client = openai.OpenAI(base_url=running.base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        chats = conversations(media, web[1])
        for key in ("http", "two"):
            got = client.chat.completions.create(model=MODEL, messages=chats[key], max_tokens=TOKENS, temperature=0)
            assert got.choices[0].message.content == run_rows[key]["text"], key
    finally:
        running.stop()
    assert gone_soon(spawned)


def test_streamed_chat_joins_to_the_text_of_batchvl_run(client, media, web, run_rows):
    chats = conversations(media, web[1])
    for key in ("http", "two"):
        chunks = list(client.chat.completions.create(model=MODEL, messages=chats[key], max_tokens=TOKENS,
                                                     temperature=0, stream=True, n=2,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        for i in range(2):
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
            assert text == run_rows[key]["text"]
            finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].index == i
                      and c.choices[0].finish_reason]
            assert finals == [run_rows[key]["finish_reason"]]
        assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == run_rows[key]["prompt_tokens"]
        assert chunks[-1].usage.completion_tokens == 2 * run_rows[key]["output_tokens"]


def test_stream_ends_with_done_and_sends_text_before_the_end(served):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count to ten"}], "max_tokens": 40,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", served.base + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks]
    # 40 tokens come in several pieces (the native engine tells them every 8 decode steps)
    assert sum(1 for t in texts if t) >= 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_repeats_and_n_choices_differ(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "a story"}], max_tokens=TOKENS, temperature=1.0,
               top_p=0.9, seed=7, n=3, extra_body={"top_k": 50, "repetition_penalty": 1.1})
    first, second = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1


def test_models_and_health(client, served):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(served.base + "/health").json() == {"status": "ok"}


def post(served, body, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = json.dumps(body) if isinstance(body, dict) else body
    return httpx.post(served.base + "/v1/chat/completions", content=content, headers=headers, timeout=60, **kwargs)


def chat(content="hi", **params) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **params}


def bad_cases(web_base: str, media: Path) -> list[tuple[str, object, int, str | None]]:
    """(name, body, status, param) of requests the server must refuse."""
    return [
        ("malformed json", b'{"model": "tiny-internvl", "messages": [', 400, None),
        ("not an object", b"[1, 2]", 400, None),
        ("unknown model", {**chat(), "model": "gpt-4o"}, 400, "model"),
        ("max_tokens a string", chat(max_tokens="ten"), 400, "max_tokens"),
        ("temperature a string", chat(temperature="hot"), 400, "temperature"),
        ("n zero", chat(n=0), 400, "n"),
        ("stream not a boolean", chat(stream="yes"), 400, "stream"),
        ("messages not a list", {**chat(), "messages": "hi"}, 400, "messages"),
        ("content a number", {**chat(), "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
        ("unknown role", {**chat(), "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
        ("media not found", chat([image(f"{web_base}/missing.png")]), 400, "messages"),
        ("media not an image", chat([image("data:image/png;base64,aGVsbG8=")]), 400, "messages"),
        ("file outside the allowed path", chat([image("file:///etc/hosts")]), 400, "messages"),
        ("unsupported scheme", chat([image("s3://bucket/x.png")]), 400, "messages"),
        ("prompt over the context", chat(max_tokens=10 ** 6), 400, "messages"),
    ]


def test_bad_requests_get_openai_errors_and_the_server_stays_up(served, web, media, client):
    for name, body, status, param in bad_cases(web[1], media):
        r = post(served, body)
        assert r.status_code == status, (name, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], name
        assert error["type"] == "invalid_request_error" and error["param"] == param, (name, error)
    assert post(served, chat(max_tokens=10 ** 6)).json()["error"]["code"] == "context_length_exceeded"
    assert client.chat.completions.create(**chat()).choices[0].message.content is not None


def test_api_key_is_required(served):
    assert post(served, chat(), key=None).status_code == 401
    wrong = post(served, chat(), key="wrong")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served.base + "/v1/models").status_code == 401
    assert httpx.get(served.base + "/metrics").status_code == 200  # no key for health and metrics


def test_oversized_bodies_get_413(served):
    big = json.dumps(chat("x" * (3 << 20))).encode()
    assert post(served, big).status_code == 413  # refused by its Content-Length

    def chunks():  # no Content-Length: refused while it is read
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + 1 << 16]

    r = post(served, chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_full_queue_gets_429_and_the_waiting_requests_are_answered(served, web):
    """32 requests (the queue's size) wait for a media fetch held back by the media server: the 33rd is refused;
    once the media comes, the 32 are answered."""
    gate = web[0].routes["/slow.png"].gate
    gate.clear()
    slow = chat([image(f"{web[1]}/slow.png")])

    async def go():
        async with httpx.AsyncClient(base_url=served.base, timeout=60,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            waiting = [asyncio.create_task(http.post("/v1/chat/completions", json=slow)) for _ in range(32)]
            while web[0].routes["/slow.png"].hits < 32 and not any(t.done() for t in waiting):
                await asyncio.sleep(0.01)
            refused = await http.post("/v1/chat/completions", json=chat())
            gate.set()
            return refused, await asyncio.gather(*waiting)

    refused, answered = asyncio.run(go())
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in answered] == [200] * 32


def test_a_client_that_does_not_read_its_stream_blocks_nobody(served, client):
    body = chat("talk", max_tokens=16, stream=True)
    with httpx.stream("POST", served.base + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as stalled:
        assert stalled.status_code == 200  # and never read
        for _ in range(3):
            assert client.chat.completions.create(**chat()).choices[0].finish_reason in ("stop", "length")


def test_200_requests_from_32_clients_are_each_answered_once(served):
    """Eight prompts, 25 requests each, two tokens: every request is answered, and the answers of one prompt are
    all the same text (an answer handed to the wrong request would show)."""
    metrics = served.service.metrics
    before = metrics.value("engine_rows_total", origin="online")
    prompts = [f"prompt number {i} says" for i in range(8)]

    async def go():
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=served.base, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"},
                                     limits=httpx.Limits(max_connections=32)) as http:
            async def one(i: int):
                async with limit:
                    r = await http.post("/v1/chat/completions", json=chat(prompts[i % 8], temperature=0))
                    return i, r

            return await asyncio.gather(*(one(i) for i in range(200)))

    answers = asyncio.run(go())
    assert all(r.status_code == 200 for _, r in answers), [r.text for _, r in answers if r.status_code != 200][:3]
    bodies = [(i, r.json()) for i, r in answers]
    assert len({b["id"] for _, b in bodies}) == 200
    by_prompt: dict[int, set[str]] = {}
    for i, b in bodies:
        by_prompt.setdefault(i % 8, set()).add(b["choices"][0]["message"]["content"])
    assert all(len(texts) == 1 for texts in by_prompt.values()), by_prompt
    assert metrics.value("engine_rows_total", origin="online") - before == 200


def test_metrics_in_prometheus_text(served, client):
    client.chat.completions.create(**chat())
    text = httpx.get(served.base + "/metrics").text
    families = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}
    for name, kind in [("requests_total", "counter"), ("prompt_tokens_total", "counter"),
                       ("completion_tokens_total", "counter"), ("queue_depth", "gauge"),
                       ("engine_batch_rows", "histogram"), ("request_latency_seconds", "histogram"),
                       ("time_to_first_token_seconds", "histogram"), ("queue_wait_seconds", "histogram")]:
        assert families.get("batchvl_" + name) == kind, name
    assert 'batchvl_requests_total{code="200",route="/v1/chat/completions"}' in text
    assert 'batchvl_requests_total{code="400",route="/v1/chat/completions"}' in text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines["batchvl_completion_tokens_total"]) > 0
    calls = float(lines["batchvl_engine_batch_rows_count"])
    assert float(lines["batchvl_engine_batch_rows_sum"]) > calls  # requests shared engine calls
    assert lines['batchvl_engine_batch_rows_bucket{le="+Inf"}'] == lines["batchvl_engine_batch_rows_count"]


def test_private_addresses_are_refused_by_default():
    """Without --allow-private-media, media on loopback is refused, by address and by name."""
    from batchvl.errors import RowError
    from batchvl.media.fetch import Fetcher, FetchSettings

    s = MediaServer()
    base = s.start()
    s.routes["/x.png"] = Route(body=b"png")
    try:
        async def fetch(url: str, allow: bool):
            fetcher = Fetcher(FetchSettings(allow_private=allow, http_retries=0))
            try:
                return await fetcher.fetch(url, Path("."))
            finally:
                await fetcher.close()

        port = base.rsplit(":", 1)[1]
        for url in (f"{base}/x.png", f"http://localhost:{port}/x.png"):
            with pytest.raises(RowError, match="refused to fetch .* loopback address"):
                asyncio.run(fetch(url, allow=False))
        assert asyncio.run(fetch(f"{base}/x.png", allow=True)).data == b"png"
        assert s.routes["/x.png"].hits == 1  # the refused ones never connected
    finally:
        s.stop()


@pytest.mark.parametrize("address, why", [("127.0.0.1", "loopback"), ("10.1.2.3", "private"),
                                          ("169.254.169.254", "link-local"), ("0.0.0.0", "unspecified"),
                                          ("::1", "loopback"), ("::ffff:192.168.0.1", "private"),
                                          ("fe80::1%eth0", "link-local"), ("224.0.0.1", "multicast"),
                                          ("93.184.215.14", None), ("2606:4700::1111", None)])
def test_refused_addresses(address, why):
    from batchvl.media.fetch import refused_address

    assert refused_address(address) == why


def test_bodies_are_json_errors_for_unknown_routes(served):
    r = httpx.get(served.base + "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(served.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 405 and "error" in r.json()



# ---- the Batch API -------------------------------------------------------------------------------------------


def batch_line(custom_id: str, messages, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": MODEL, "messages": messages, "max_tokens": TOKENS, "temperature": 0,
                                **body}}) + "\n"


def wait_for(client, batch_id: str, states=("completed", "failed", "cancelled")):
    deadline = time.monotonic() + 60
    while (batch := client.batches.retrieve(batch_id)).status not in states:
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)
    return batch


def test_batch_api_round_trip_answers_each_custom_id_once(client, media, web, run_rows, tmp_path):
    chats = conversations(media, web[1])
    lines = [batch_line(k, chats[k]) for k in ("http", "text", "two")]
    lines.append(batch_line("other-model", chats["text"], model="gpt-4o"))
    lines.append(batch_line("bad-type", chats["text"], temperature="hot"))
    lines.append(batch_line("bad-media", [{"role": "user", "content": [image("file:///etc/hosts")]}]))
    upload = tmp_path / "requests.jsonl"
    upload.write_text("".join(lines))
    file = client.files.create(file=upload.open("rb"), purpose="batch")
    assert file.purpose == "batch" and file.bytes == upload.stat().st_size
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"run": "test"})
    assert batch.status in ("validating", "in_progress")
    batch = wait_for(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 3, 3)
    assert batch.id in [b.id for b in client.batches.list().data]
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    ids = [x["custom_id"] for x in out + errors]
    assert sorted(ids) == sorted(["http", "text", "two", "other-model", "bad-type", "bad-media"])
    for line in out:
        row = run_rows[line["custom_id"]]
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == row["text"]
        assert body["usage"]["prompt_tokens"] == row["prompt_tokens"]
    assert all(e["response"] is None and e["error"]["message"] for e in errors)
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_batch_api_refusals(client, served, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a"}\nnot json\n' + batch_line("a", "hi"))
    batch = client.batches.create(input_file_id=client.files.create(file=bad.open("rb"), purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait_for(client, batch.id)
    assert batch.status == "failed" and {e.code for e in batch.errors.data} >= {"invalid_json_line",
                                                                                  "duplicate_custom_id"}
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nothing", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id="file-x", endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=bad.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nothing")
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (5 << 20))
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=big.open("rb"), purpose="batch")
    assert e.value.status_code == 413


def test_cancelled_batch_keeps_what_it_did_and_stops(client, web, tmp_path):
    """A batch whose rows wait for held-back media is cancelled; once the media comes it runs no more engine
    batches and ends cancelled, each custom_id answered at most once."""
    gate = web[0].routes["/slow.png"].gate
    gate.clear()
    slow = [{"role": "user", "content": [image(f"{web[1]}/slow.png")]}]
    upload = tmp_path / "slow.jsonl"
    upload.write_text("".join(batch_line(f"r{i}", slow, max_tokens=2) for i in range(12)))
    batch = client.batches.create(input_file_id=client.files.create(file=upload.open("rb"), purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(client, batch.id, states=("in_progress",))
    assert client.batches.cancel(batch.id).status == "cancelling"
    gate.set()
    batch = wait_for(client, batch.id)
    assert batch.status == "cancelled"
    done = batch.request_counts.completed + batch.request_counts.failed
    assert done < 12
    if batch.output_file_id:
        ids = [json.loads(x)["custom_id"] for x in client.files.content(batch.output_file_id).text.splitlines()]
        assert len(ids) == len(set(ids)) == batch.request_counts.completed
