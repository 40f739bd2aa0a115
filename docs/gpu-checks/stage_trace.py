"""Why the 1B pipeline's vision stage averages 1.66 s a batch of 896 tiles in `bench` when one profiled batch
took 1.31 s (issue 17, session 9): each engine stage's entries in order, with the GPU's SM clock, power and
throttle reasons sampled by nvidia-smi meanwhile. Slower later batches with a falling clock would be the GPU's
power or heat limit; even batches at one clock would be something between them.

Usage: python3 stage_trace.py [SHAPE [WORKLOAD [ROWS [BATCH [KEY=VALUE...]]]]]  (default internvl2-1b caption-7tile
1024 128; the warm-up is one batch; media in all cores but two as processes, as `batchvl run` has it on a GPU;
KEY=VALUE: more settings, as bench's --set takes them). SHAPE tiny runs on the CPU, without nvidia-smi, as a check
of this script. With `refill=true` each "batch" below is an admission (its vision pass, its prefill) and the
decode steps until the next; the slowest prefill entries are listed after the table (a compilation shows there).
"""
import shutil
import subprocess
import sys
import threading
import time

import batchvl.engine.timing as timing
from batchvl.host import usable_cores
from batchvl.run.loop import SPARE_CORES

entries = []  # (stage, start, seconds)
samples = []  # (time, sm MHz, watts, celsius, throttle reasons)


def sample_gpu(proc):
    for line in proc.stdout:
        parts = [p.strip() for p in line.split(",")]
        try:
            samples.append((time.perf_counter(), float(parts[0]), float(parts[1]), float(parts[2]), parts[3]))
        except (ValueError, IndexError):
            pass


def window(t0, t1):
    inside = [s for s in samples if t0 <= s[0] <= t1]
    if not inside:
        return "-"
    clock = sum(s[1] for s in inside) / len(inside)
    watts = sum(s[2] for s in inside) / len(inside)
    reasons = sorted({s[4] for s in inside})
    return f"{clock:.0f} MHz, {watts:.0f} W, {max(s[3] for s in inside):.0f} C, reasons {'/'.join(reasons)}"


def main():
    defaults = ["internvl2-1b", "caption-7tile", "1024", "128"]
    shape, workload, rows, batch = (sys.argv[1:] + defaults[len(sys.argv) - 1:])[:4]
    extra = sys.argv[5:]
    timing.StageTimes.entries = entries
    proc = None
    if shutil.which("nvidia-smi") and shape != "tiny":
        proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu,"
                                 "clocks_event_reasons.active", "--format=csv,noheader,nounits", "-lms", "100"],
                                stdout=subprocess.PIPE, text=True)
        threading.Thread(target=sample_gpu, args=(proc,), daemon=True).start()
    from batchvl.tools import bench
    sides, peak = bench.bench(shape, workload, int(rows), int(batch), None, 0, 0, None,
                              device="cpu" if shape == "tiny" else "cuda", warmup_rows=int(batch), no_save=True,
                              settings=[f"media.prepare_processes={max(usable_cores() - SPARE_CORES, 0)}", *extra])
    print(bench.format_sides(sides, peak))
    if proc:
        proc.terminate()
    # a batch: its entries from one vision entry to the next
    batches, current = [], []
    for entry in entries:
        if entry[0] == "vision" and any(e[0] == "vision" for e in current):
            batches.append(current)
            current = []
        current.append(entry)
    batches.append(current)
    print("| batch | vision s | prefill s | decode s | batch wall s | GPU meanwhile (vision) "
          "| GPU meanwhile (decode) |")
    print("|---|---|---|---|---|---|---|")
    for i, b in enumerate(batches):
        sums = {k: sum(e[2] for e in b if e[0] == k) for k in ("vision", "prefill", "decode")}
        vis = [e for e in b if e[0] == "vision"]
        dec = [e for e in b if e[0] == "decode" and e[2] > 0.05]
        wall = b[-1][1] + b[-1][2] - b[0][1]
        print(f"| {i} | {sums['vision']:.3f} | {sums['prefill']:.3f} | {sums['decode']:.3f} | {wall:.3f} | "
              f"{window(vis[0][1], vis[-1][1] + vis[-1][2]) if vis else '-'} | "
              f"{window(dec[0][1], dec[-1][1] + dec[-1][2]) if dec else '-'} |")
    prefills = sorted((e for e in entries if e[0] == "prefill"), key=lambda e: -e[2])
    print("the slowest prefill entries (s, from the first entry):",
          ", ".join(f"{e[2]:.3f} at {e[1] - entries[0][1]:.1f}" for e in prefills[:8]))


if __name__ == "__main__":
    main()
