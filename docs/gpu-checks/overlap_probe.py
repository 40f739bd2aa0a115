"""Overlap probe (issue 17): does the vision pass of the next batch hide under the current batch's decode?

The internvl2-1b shape, random bf16 weights, the native engine's own graphs: one decode step of 128 rows
(DecodeGraphs, span 2,048) and one vision chunk of 64 tiles (VisionGraph). Timed:
- `steps` decode replays alone; `chunks` vision replays alone;
- both at once, the vision on a second stream: both streams at the default priority, then the decode stream
  at a higher priority than the vision's (CUDA runs a waiting high-priority kernel's blocks first).
Usage: python3 overlap_probe.py [steps] [chunks]
"""
import sys
import tempfile
import time
from pathlib import Path

import torch

from batchvl.engine.base import GenerationParams
from batchvl.engine.graphs import VisionGraph
from batchvl.engine.native import NativeEngine
from batchvl.models.checkpoint import CheckpointInfo, load_tokenizer
from batchvl.tools.check_parity import write_skeleton
from batchvl.tools.shapes import SHAPES

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
CHUNKS = int(sys.argv[2]) if len(sys.argv) > 2 else 14
dev = torch.device("cuda")


def wall(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


with tempfile.TemporaryDirectory() as tmp:
    model = write_skeleton("internvl2-1b", Path(tmp) / "m", shapes=SHAPES)
    tokenizer = load_tokenizer(model)
    params = GenerationParams(max_new_tokens=128)
    engine = NativeEngine(CheckpointInfo.read(model), tokenizer, params, device="cuda", dtype="bfloat16",
                          max_batch_size=128, load_format="dummy")
with torch.inference_mode():
    cache, span = engine.runner.reserve(128, 2048)
    graphs = engine.runner.graphs
    token = torch.randint(0, 1000, (128,), device=dev)
    positions = torch.randint(1800, 2000, (128,), device=dev)
    tiles = torch.randint(0, 255, (64, 448, 448, 3), dtype=torch.uint8, device=dev)
    vision = VisionGraph(engine._vision_pass, tiles)

    def decode():
        for _ in range(STEPS):
            graphs.step(token, positions)

    def see():
        for _ in range(CHUNKS):
            vision(tiles)

    for _ in range(2):
        decode_s, vision_s = wall(decode), wall(see)
    print(f"alone: decode {STEPS} steps {decode_s * 1e3:.0f} ms ({decode_s / STEPS * 1e3:.2f} ms/step); "
          f"vision {CHUNKS} chunks {vision_s * 1e3:.0f} ms ({CHUNKS * 64 / vision_s:.0f} tiles/s); "
          f"serial sum {(decode_s + vision_s) * 1e3:.0f} ms", flush=True)
    low, high = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (0, -1)
    for label, decode_priority in (("same priority", 0), ("decode high priority", high)):
        main = torch.cuda.Stream(dev, priority=decode_priority)
        side = torch.cuda.Stream(dev, priority=0)
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.cuda.stream(side):
                see()
                side_done = torch.cuda.Event()
                side_done.record(side)
            with torch.cuda.stream(main):
                decode()
                main_done = torch.cuda.Event()
                main_done.record(main)
            main_done.synchronize()
            decode_end = time.perf_counter() - t
            side_done.synchronize()
            both = time.perf_counter() - t
        print(f"{label} (range {low}..{high}): both done in {both * 1e3:.0f} ms, decode done at "
              f"{decode_end * 1e3:.0f} ms; saved {(decode_s + vision_s - both) * 1e3:.0f} ms of "
              f"{min(decode_s, vision_s) * 1e3:.0f} possible", flush=True)
