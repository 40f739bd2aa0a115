"""GPU smoke check of the engine's batch state and bucketed decode graphs: batches of 11, 5, 16 and 3 rows
(max_batch_size 16) on the tiny model in float32, CUDA graphs on against off (eager), greedy and sampled, with
the Triton decode kernel and with SDPA. Prints how many rows have identical token ids."""
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from batchvl.engine.base import GenerationParams
from batchvl.engine.native import NativeEngine
from batchvl.models.checkpoint import CheckpointInfo, checkpoint_chat_template, load_tokenizer
from batchvl.tools.check_parity import sample_rows
from batchvl.tools.tiny import make_tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
d = Path(tempfile.mkdtemp()) / "tiny"
make_tiny_model(d)
ck, tok = CheckpointInfo.read(d), load_tokenizer(d)
base = sample_rows(tok, checkpoint_chat_template(d, tok), ck.tokens_per_tile)


def rows(n, tag):
    return [dataclasses.replace(base[i % len(base)], id=f"{tag}-{i}",
                                max_new_tokens=None if i % 3 else 7 + i) for i in range(n)]


def run(graphs, attention, **gen):
    params = GenerationParams(max_new_tokens=24, eos_token_ids=(tok.eos_token_id,), ignore_eos=True, **gen)
    eng = NativeEngine(ck, tok, params, device=DEVICE, dtype="float32", max_batch_size=16, cuda_graphs=graphs,
                       compile=False, decode_attention=attention)
    out = {}
    t = time.perf_counter()
    for k, n in enumerate((11, 5, 16, 3)):
        batch = rows(n, f"b{k}")
        eng.generate(batch)
        for r, toks in zip(batch, eng.last_tokens, strict=True):
            out[r.id] = toks
    dt = time.perf_counter() - t
    eng.close()
    return out, dt


for attention in ("triton", "sdpa"):
    for name, gen in (("greedy", {}), ("sampled", dict(temperature=1.0, top_k=50, seed=3)),
                      ("min_new+penalty", dict(min_new_tokens=5, repetition_penalty=1.3))):
        g, tg = run(True, attention, **gen)
        e, te = run(False, attention, **gen)
        same = sum(g[k] == e[k] for k in e)
        print(f"smoke {attention:6s} {name:16s}: graphs vs eager {same}/{len(e)} rows identical "
              f"({tg:.1f} s vs {te:.1f} s)", flush=True)
