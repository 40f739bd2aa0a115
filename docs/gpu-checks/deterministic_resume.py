"""The deterministic mode's proof across runs (issue 21, item 2): with `engine.deterministic: true`, each row's text
is the same whatever the batch size, and when a run is killed and resumed with another batch size.

Runs `batchvl run` (each a process of its own) over caption-7tile JPEGs of the named shape, random weights built on
the device (`load_format: dummy`, seeded: every run gets the same weights):
- A: batch `big` (the reference);
- B: batch `mid`, killed with SIGKILL before its 3rd batch, then resumed in the same folder with batch `small`;
- C: batch 1 over the first 64 rows;
and with the mode off, D: batch `mid`, to show what the mode changes. Prints, for B, C and D, how many rows have A's
text. Usage: python3 deterministic_resume.py SHAPE ROWS [big mid small]   (SHAPE `tiny` runs on the CPU, with the
kernels interpreted: a check of this script, not of the mode's speed)
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from batchvl.tools.bench_data import prepare_data
from batchvl.tools.check_parity import write_skeleton
from batchvl.tools.shapes import SHAPES
from batchvl.tools.tiny import make_tiny_model

shape, rows = sys.argv[1], int(sys.argv[2])
big, mid, small = (int(a) for a in sys.argv[3:6]) if len(sys.argv) > 5 else (128, 64, 16)
cpu = shape == "tiny"
env = dict(os.environ, TRITON_INTERPRET="1") if cpu else dict(os.environ)


def run(root: Path, model: Path, rows_file: Path, name: str, batch: int, deterministic: bool = True,
        fault: str | None = None, out: str | None = None) -> int:
    spec = {
        "model": str(model), "chat_template": str(root / "short.jinja"),
        "input": {"path": str(rows_file), "id_column": "id", "prompt_column": "prompt", "image_column": "image"},
        "output": {"path": str(root / f"out-{out or name}"), "rows_per_file": max(1, batch)},
        "generation": {"max_new_tokens": 8 if cpu else 64, "ignore_eos": True},
        "engine": {"device": "cpu" if cpu else "cuda", "dtype": "float32" if cpu else "bfloat16",
                   "max_batch_size": batch, "deterministic": deterministic,
                   "load_format": "auto" if cpu else "dummy"},
        "run": {"max_error_fraction": 0.0},
    }
    job = root / f"{name}.yaml"
    job.write_text(json.dumps(spec))
    extra = {"BATCHVL_FAULT": fault} if fault else {}
    done = subprocess.run([sys.executable, "-m", "batchvl", "run", str(job), "-q"], env={**env, **extra})
    print(f"{name}: batch {batch}, deterministic {deterministic}{', ' + fault if fault else ''}: exit code "
          f"{done.returncode}", flush=True)
    return done.returncode


def texts(root: Path, name: str) -> dict[str, str]:
    table = pq.read_table(root / f"out-{name}", columns=["id", "text", "error"]).to_pylist()
    assert len({r["id"] for r in table}) == len(table), f"{name}: an id written twice"
    assert not any(r["error"] for r in table), f"{name}: error rows"
    return {r["id"]: r["text"] for r in table}


with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
    root = Path(tmp)
    model = root / "model"
    make_tiny_model(model) if cpu else write_skeleton(shape, model, shapes=SHAPES)
    rows_file = prepare_data(root, "caption-7tile", rows)
    first = root / "first.jsonl"
    first.write_text("\n".join(rows_file.read_text().splitlines()[: min(64, rows)]) + "\n")
    run(root, model, rows_file, "A", big)
    killed = run(root, model, rows_file, "B", mid, fault="kill:batch:3")
    resumed = run(root, model, rows_file, "B-resumed", small, out="B")
    run(root, model, first, "C", 1)
    run(root, model, rows_file, "D", mid, deterministic=False)
    a = texts(root, "A")
    for name in ("B", "C", "D"):
        got = texts(root, name)
        same = sum(got[i] == a[i] for i in got)
        print(f"{name}: {same}/{len(got)} rows have A's text", flush=True)
    print(f"B was killed (exit code {killed}) and resumed (exit code {resumed}); each id once in every folder")
