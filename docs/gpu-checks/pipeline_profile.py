"""Where a pipeline batch leaves the GPU idle (issue 17): the 1B shape's stages run 10–20% slower inside
`batchvl run` than in the engine alone (BENCHMARKS.md, sessions 7 and 8), and this says in which stage, and what
the host was doing meanwhile.

Runs one bench side (the whole pipeline: `batchvl run` over caption-7tile JPEGs, random weights) with the torch
profiler on for one engine call (batch PROFILE, counted from 0, after the warm-up ones). Each engine stage is
labelled; for each, it prints the wall time, the time the GPU ran something (kernels and copies, their intervals
merged), the idle time, and the longest idle gaps with the host operations that began in them.
Usage: python3 pipeline_profile.py [SHAPE [WORKLOAD [ROWS [BATCH [PROFILE]]]]]   (default internvl2-1b
caption-7tile 512 128 2; SHAPE tiny runs on the CPU, as a check of this script). Writes the trace to
$OUT/trace.json.gz when $OUT is set.
"""
import gzip
import os
import sys
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

SPARE_CORES = 2  # as batchvl.run.loop's: media in processes, as `batchvl run` has it on a GPU


def merged(intervals):
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def report(prof, title: str) -> None:
    from torch.autograd import DeviceType

    events = prof.events()
    stages = [(e.name.removeprefix("stage:"), e.time_range.start, e.time_range.end)
              for e in events if e.name.startswith("stage:")]
    gpu = merged([(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA])

    def top_level(e) -> bool:  # an operation the engine's code called, not one inside another
        parent = e.cpu_parent
        return parent is None or parent.name.startswith("stage:")

    host = [e for e in events if e.device_type == DeviceType.CPU and not e.name.startswith("stage:") and top_level(e)]
    totals = defaultdict(lambda: [0.0, 0.0, 0])
    gaps = defaultdict(list)
    for name, start, end in stages:
        busy, cursor = 0.0, start
        for g0, g1 in gpu:
            lo, hi = max(g0, start), min(g1, end)
            if hi <= lo:
                continue
            if lo - cursor > 0:
                gaps[name].append((lo - cursor, cursor, lo))
            busy += hi - lo
            cursor = hi
        if end - cursor > 0:
            gaps[name].append((end - cursor, cursor, end))
        t = totals[name]
        t[0] += end - start
        t[1] += busy
        t[2] += 1
    print(title)
    print("| stage | entries | wall ms | GPU busy ms | GPU idle ms |")
    print("|---|---|---|---|---|")
    for name, (wall, busy, n) in totals.items():
        print(f"| {name} | {n} | {wall / 1e3:.1f} | {busy / 1e3:.1f} | {(wall - busy) / 1e3:.1f} |")
    for name, found in gaps.items():
        found.sort(reverse=True)
        print(f"longest idle gaps in {name}:")
        for length, g0, g1 in found[:6]:
            began = sorted((e for e in host if g0 <= e.time_range.start < g1),
                           key=lambda e: -(e.time_range.end - e.time_range.start))[:4]
            ops = ", ".join(f"{e.name} {(e.time_range.end - e.time_range.start) / 1e3:.2f} ms" for e in began)
            print(f"  {length / 1e3:.2f} ms: {ops or '(no host operation began in it)'}")


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from batchvl.engine.native import NativeEngine
    from batchvl.engine.timing import StageTimes
    from batchvl.tools.bench import run_side
    from batchvl.tools.bench_data import prepare_data
    from batchvl.tools.check_parity import build_checkpoint, write_skeleton
    from batchvl.tools.shapes import SHAPES

    args = sys.argv[1:]
    shape = args[0] if args else "internvl2-1b"
    workload = args[1] if len(args) > 1 else "caption-7tile"
    rows, batch, which = (int(a) for a in (args[2:5] + ["512", "128", "2"][len(args[2:5]):]))
    cuda = torch.cuda.is_available() and shape != "tiny"
    plain_stage, plain_generate = StageTimes.stage, NativeEngine.generate
    calls, profiles = [0], []

    @contextmanager
    def labelled_stage(self, name):
        with record_function(f"stage:{name}"), plain_stage(self, name):
            yield

    def profiled_generate(self, requests):
        index = calls[0]
        calls[0] += 1
        if index != which:
            return plain_generate(self, requests)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            out = plain_generate(self, requests)
            if cuda:
                torch.cuda.synchronize()
        profiles.append(prof)
        return out

    StageTimes.stage = labelled_stage
    NativeEngine.generate = profiled_generate
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if cuda:
            model = write_skeleton(shape, root / "model", shapes=SHAPES)
            settings = {"engine": {"load_format": "dummy"},
                        "media": {"prepare_processes": max((os.cpu_count() or 1) - SPARE_CORES, 0)}}
        else:
            model = build_checkpoint(shape, root / "model", torch.device("cpu"), torch.float32, shapes=SHAPES)
            settings = {}
        rows_file = prepare_data(root, workload, rows)
        side = run_side("profiled", root, model, rows_file, "native", batch, workload, rows,
                        "cuda" if cuda else "cpu", settings)
        print(f"{side.rows} rows, {side.images / side.seconds:.2f} images/s with the profiler on for one engine call; "
              f"stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in side.stages.items()))
        if not profiles:
            sys.exit(f"no engine call {which}: {calls[0]} calls")
        report(profiles[0], f"{shape} / {workload}: engine call {which} "
                            f"({'profiled on CUDA' if cuda else 'CPU only: no GPU times'})")
        out = os.environ.get("OUT")
        if out:
            trace = Path(out) / "trace.json"
            profiles[0].export_chrome_trace(str(trace))
            with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
                dst.write(src.read())
            trace.unlink()


if __name__ == "__main__":  # not in the spawned media workers, which import this file again
    main()
