"""`batchvl serve` against `batchvl run` on the same rows (issue 18, item 9): the internvl2-1b shape with random
weights, caption-7tile JPEGs, 128 new tokens a row (ignore_eos), batch 128, on one GPU.

run:   bench's own run_side: one run over 128 warm-up rows, then ROWS rows timed on the same engine (as the server
       keeps its engine warm between requests; until session 9 the warm-up was a run of its own on another engine).
serve: `batchvl serve job.yaml` in a subprocess; 128 warm-up requests, then ROWS requests (file:// image URLs)
       from CLIENTS concurrent aiohttp clients; images/s from the first request sent to the last answer.
Usage: python3 serve_bench.py [ROWS] [CLIENTS]
"""
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import torch

from batchvl.tools.bench import run_side
from batchvl.tools.bench_data import prepare_data
from batchvl.tools.check_parity import build_checkpoint

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 512
CLIENTS = int(sys.argv[2]) if len(sys.argv) > 2 else 128
WARM = 128
root = Path("/tmp/serve-bench")
root.mkdir(parents=True, exist_ok=True)
model = build_checkpoint("internvl2-1b", root / "model", torch.device("cuda"), torch.bfloat16)
rows_file = prepare_data(root, "caption-7tile", WARM + ROWS)
rows = [json.loads(line) for line in rows_file.read_text().splitlines()]

side = run_side("run", root, model, rows_file, "native", 128, "caption-7tile", ROWS, warmup_rows=WARM)
print(f"batchvl run: {side.rows} rows, {side.images / side.seconds:.2f} images/s ({side.seconds:.1f} s after the "
      "warm-up)", flush=True)
torch.cuda.empty_cache()

job = {"model": str(model), "chat_template": str(root / "short.jinja"), "media": {"max_dynamic_patch": 12},
       "generation": {"max_new_tokens": 128, "ignore_eos": True},
       "engine": {"backend": "native", "dtype": "bfloat16", "max_batch_size": 128}}
(root / "serve.yaml").write_text(json.dumps(job))
server = subprocess.Popen([sys.executable, "-m", "batchvl", "serve", str(root / "serve.yaml"), "--port", "23333",
                           "--allowed-local-media-path", str(root), "--state-dir", str(root / "state"),
                           "--max-queue", "1024"])


async def ask(session, row):
    body = {"model": "model", "max_tokens": 128, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"file://{row['image']}"}},
        {"type": "text", "text": row["prompt"]}]}]}
    async with session.post("http://127.0.0.1:23333/v1/chat/completions", json=body) as r:
        data = await r.json()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {data}")
        return data["usage"]["completion_tokens"]


async def load(part):
    gate = asyncio.Semaphore(CLIENTS)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        async def one(row):
            async with gate:
                return await ask(session, row)
        return await asyncio.gather(*(one(r) for r in part))


async def main():
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            try:
                async with session.get("http://127.0.0.1:23333/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    t = time.perf_counter()
    await load(rows[:WARM])
    print(f"serve warm-up: {WARM} requests in {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    tokens = await load(rows[WARM:])
    dt = time.perf_counter() - t
    print(f"batchvl serve: {len(tokens)} requests from {CLIENTS} clients, {sum(tokens)} tokens, {dt:.1f} s, "
          f"{len(tokens) / dt:.2f} images/s", flush=True)
    async with aiohttp.ClientSession() as session, session.get("http://127.0.0.1:23333/metrics") as r:
        text = await r.text()
    print("\n".join(line for line in text.splitlines() if line.startswith("batchvl_") and "bucket" not in line))


try:
    asyncio.run(main())
finally:
    server.terminate()
    server.wait(timeout=60)
