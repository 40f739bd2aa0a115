"""Engine-alone probe (issue 17): the 1B pipeline's stages without the run loop, the media threads or the writer.

The internvl2-1b shape, random bf16 weights, the native engine as `batchvl run` builds it (compiled, graphs).
Batches of 128 caption-7tile-like rows (7 pinned uint8 tiles each, 1,792 image tokens in a 1,822-token prompt,
128 forced new tokens) go straight to `engine.generate`, with the engine's stage times synchronised:
- quiet: nothing else in the process;
- busy: 14 threads doing what media preparation does in Python and PIL (decode, resize, crop) meanwhile.
Then the vision pass alone (`engine.vision.compute`) on the same rows, quiet and busy.
If the quiet engine runs far above the pipeline's images/s, the gap is in the process around it.
Usage: python3 engine_probe.py [batches]
"""
import io
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from batchvl.core import Request
from batchvl.engine.base import GenerationParams
from batchvl.engine.native import NativeEngine
from batchvl.models.checkpoint import CheckpointInfo, load_tokenizer
from batchvl.tools.check_parity import write_skeleton
from batchvl.tools.shapes import SHAPES

BATCHES = int(sys.argv[1]) if len(sys.argv) > 1 else 4
ROWS, TILES, NEW = 128, 7, 128

with tempfile.TemporaryDirectory() as tmp:
    model = write_skeleton("internvl2-1b", Path(tmp) / "m", shapes=SHAPES)
    tokenizer = load_tokenizer(model)
    params = GenerationParams(max_new_tokens=NEW, ignore_eos=True)
    engine = NativeEngine(CheckpointInfo.read(model), tokenizer, params, device="cuda", dtype="bfloat16",
                          max_batch_size=ROWS, load_format="dummy")
engine.times.sync = True
ctx = engine.image_token_id
g = torch.Generator().manual_seed(0)


def row(i: int) -> Request:
    tiles = torch.randint(0, 255, (TILES, 448, 448, 3), dtype=torch.uint8, generator=g).pin_memory()
    ids = [100 + (i + j) % 5000 for j in range(20)] + [ctx] * (TILES * 256) + [200 + j for j in range(10)]
    return Request(f"r{i}", ids, tiles, [TILES])


batches = [[row(b * ROWS + i) for i in range(ROWS)] for b in range(BATCHES)]
stop = threading.Event()


def media_work():
    """Roughly one preparation thread: decode a JPEG, resize, crop 7 tiles, in PIL and Python."""
    buf = io.BytesIO()
    Image.new("RGB", (1344, 896), (120, 30, 200)).save(buf, "JPEG")
    data = buf.getvalue()
    while not stop.is_set():
        im = Image.open(io.BytesIO(data)).convert("RGB").resize((1344, 896))
        tiles = [im.crop((x, y, x + 448, y + 448)) for x in range(0, 1344, 448) for y in range(0, 896, 448)]
        sum(len(t.tobytes()) for t in tiles[:2])


def timed(label: str) -> None:
    engine.generate(batches[0])  # warm-up: graphs, compile
    engine.times.seconds.clear()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for b in batches:
        engine.generate(b)
    torch.cuda.synchronize()
    run = time.perf_counter() - t
    stages = ", ".join(f"{k} {v:.2f}" for k, v in engine.times.seconds.items())
    print(f"{label}: generate {BATCHES * ROWS} rows in {run:.2f} s = {BATCHES * ROWS / run:.1f} images/s ({stages})",
          flush=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            engine.vision.compute(b)
    torch.cuda.synchronize()
    v = time.perf_counter() - t
    print(f"{label}: vision alone {BATCHES * ROWS * TILES / v:.0f} tiles/s", flush=True)


timed("quiet")
workers = [threading.Thread(target=media_work, daemon=True) for _ in range(14)]
for w in workers:
    w.start()
timed("busy (14 threads)")
stop.set()
