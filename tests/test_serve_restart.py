"""`batchvl serve` as its own process: killed with SIGKILL in the middle of a Batch API batch (the crash tests'
fault injection, at the second part file's commit), started again, it finishes the batch with every custom_id
answered exactly once, running only the rows that were not committed; SIGTERM lets a request in flight finish,
then the server exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from batchvl.io.writer import part_files

ROOT = Path(__file__).resolve().parents[1]
ROWS = 6


def start_server(model: Path, state: Path, fault: str | None = None) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BATCHVL_FAULT", None)
    if fault:
        env["BATCHVL_FAULT"] = fault
    cmd = [sys.executable, "-m", "batchvl", "serve", str(model), "--host", "127.0.0.1", "--port", "0", "-q",
           "--state-dir", str(state), "--set", "engine.device=cpu", "--set", "engine.dtype=float32",
           "--set", "engine.max_batch_size=4", "--set", "output.rows_per_file=2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the startup line, once it listens (EOF if it died)
    assert line.startswith("batchvl serve: tiny-internvl on http://"), (line, proc.stderr.read())
    return proc, line.split(" on ")[1].split()[0].removesuffix("/v1")


def wait_for(client: openai.OpenAI, batch_id: str):
    deadline = time.monotonic() + 60
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)
    return batch


def test_kill_9_mid_batch_then_restart_answers_each_custom_id_once(tiny_model, tmp_path):
    state = tmp_path / "state"
    proc, base = start_server(tiny_model, state, fault="kill:write:2")  # dies committing the 2nd part
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        lines = [json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "tiny-internvl", "max_tokens": 2, "temperature": 0,
                                      "messages": [{"role": "user", "content": f"question {i}"}]}}) + "\n"
                 for i in range(ROWS)]
        upload = tmp_path / "requests.jsonl"
        upload.write_text("".join(lines))
        file = client.files.create(file=upload.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    assert len(part_files(state / "batches" / batch.id / "out")) == 1  # the first part was committed, not the 2nd

    proc, base = start_server(tiny_model, state)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        batch = wait_for(client, batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == ROWS
        out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(x["custom_id"] for x in out) == [f"req-{i}" for i in range(ROWS)]
        assert batch.error_file_id is None
        metrics = httpx.get(base + "/metrics").text
        assert 'batchvl_engine_rows_total{origin="batch"} 4' in metrics  # only the rows not committed ran

        # SIGTERM with a request in flight: it is answered to its end, then the server exits 0.
        body = {"model": "tiny-internvl", "messages": [{"role": "user", "content": "go"}], "max_tokens": 48,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: the request is in the engine's hands
            proc.send_signal(signal.SIGTERM)
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert finish[-1] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
