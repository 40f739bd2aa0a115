"""Decode-loop probe, for either tree (PYTHONPATH at it): the internvl2-1b shape, 128 text-only rows of 1,828
prompt tokens, 128 new tokens (ignore_eos), compiled, graphs on. Times NativeEngine.generate three times
(the first pays compile and capture), alone and with 12 busy Python threads holding the GIL as preparation
threads do."""
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

try:
    from batchvl.tools.check_parity import build_checkpoint  # new tree
    from batchvl.tools.shapes import SHAPES
except ImportError:
    from batchvl.check import build_checkpoint  # old tree
    from batchvl.shapes import SHAPES
from batchvl.core import Request
from batchvl.engine.base import GenerationParams
from batchvl.engine.native import NativeEngine
from batchvl.models.checkpoint import CheckpointInfo, load_tokenizer

tag = sys.argv[1]
root = Path(tempfile.mkdtemp(dir="/tmp"))
path = build_checkpoint("internvl2-1b", root / "m", torch.device("cuda"), torch.bfloat16, shapes=SHAPES)
ck, tok = CheckpointInfo.read(path), load_tokenizer(path)
params = GenerationParams(max_new_tokens=128, eos_token_ids=(tok.eos_token_id,), ignore_eos=True)
eng = NativeEngine(ck, tok, params, device="cuda", dtype="bfloat16", max_batch_size=128)
g = torch.Generator().manual_seed(0)
rows = [Request(id=f"r{i}", prompt_ids=torch.randint(10, 1000, (1828,), generator=g).tolist(), tiles=None,
                tiles_per_image=[]) for i in range(128)]
stop = threading.Event()


def busy():
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i * i


def timed(label):
    torch.cuda.synchronize()
    t = time.perf_counter()
    eng.generate(rows)
    torch.cuda.synchronize()
    print(f"probe {tag}: {label}: {time.perf_counter() - t:.3f} s", flush=True)


timed("first call (compile, capture)")
timed("second call")
timed("third call")
threads = [threading.Thread(target=busy, daemon=True) for _ in range(12)]
sys.setswitchinterval(0.001)
for t in threads:
    t.start()
timed("with 12 busy threads")
timed("with 12 busy threads again")
stop.set()
