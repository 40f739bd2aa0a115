"""`batchvl bench`: the whole pipeline on the GPU, native engine against transformers, side by side.

It builds random bf16 weights of a named real shape on the GPU (saved as a transformers-native
checkpoint, so both sides load the same weights), writes synthetic JPEG files, and runs the same job
twice through `run_job`: reading, media preparation, engine, Parquet writing. Output lengths are forced
(`ignore_eos`), since random weights would stop anywhere. Speed is printed, never asserted. With `--no-save`
only the configs and tokenizer are written, and each side builds its own random weights on the GPU
(`engine.load_format: dummy`).

Workloads (fixed, so figures compare across runs; bench_data.WORKLOADS): `caption-7tile` (every image 1344x896,
7 tiles, 128 tokens out), `mixed` (`bench-media`'s size mix, up to 12 tiles, 32 to 256 tokens a row, seeded),
`video` (8 frames x 1 tile, 256 tokens out), `caption-natural` (7 tiles, long-tailed lengths up to 400, seeded).
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from batchvl.config import Job, load_job
from batchvl.config.load import override_value
from batchvl.core import Request, Result
from batchvl.media.tiling import choose_grid
from batchvl.models.checkpoint import CheckpointInfo
from batchvl.models.footprint import describe
from batchvl.models.loader import build_specs
from batchvl.run.local import run_job
from batchvl.run.loop import build_engine
from batchvl.run.plan import plan_model
from batchvl.run.summary import Summary
from batchvl.tools.bench_data import PER_ROW_LIMITS, WORKLOADS, prepare_data
from batchvl.tools.check_parity import build_checkpoint, write_skeleton
from batchvl.tools.shapes import SHAPES


@dataclass
class Side:
    name: str
    rows: int
    images: int
    output_tokens: int
    seconds: float
    flops: float
    peak_gib: float
    stages: dict[str, float]
    calls: list[int] = field(default_factory=list)  # the rows of each timed engine call (one engine in this process)
    engine_s: float = math.nan  # those calls' wall time: stages and the engine's own work between them
    close_s: float = math.nan  # from the last row's results to the run's end (the writer's and workers' close)


def matmul_peak_tflops(device: torch.device) -> float:
    """bf16 8192^3 matrix products, timed with CUDA events: the rate MFU is measured against."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1000) / 1e12


def flops_per_row(ck: CheckpointInfo, tiles: int, prompt_tokens: int, output_tokens: int) -> float:
    """Matmul and attention FLOPs for one row: vision over its tiles, prefill, then decode."""
    vs, ts, _ = build_specs(ck)
    n = vs.grid * vs.grid + 1
    vit_layer = 2 * n * (4 * vs.hidden * vs.hidden + 2 * vs.hidden * vs.intermediate) + 4 * n * n * vs.hidden
    shuffled = vs.hidden * 4
    vision = tiles * (vs.layers_to_run * vit_layer + 2 * n * 3 * vs.patch_size**2 * vs.hidden
                      + 2 * vs.tokens_per_tile * (shuffled * ts.hidden + ts.hidden * ts.hidden))
    per_token = 2 * ts.layers * (ts.hidden * (ts.q_width + 2 * ts.kv_width) + ts.q_width * ts.hidden
                                 + 3 * ts.hidden * ts.intermediate)
    attn = 4 * ts.layers * ts.q_width  # per (query, key) pair
    p, o = prompt_tokens, output_tokens
    prefill = p * per_token + attn * p * (p + 1) / 2
    decode = o * per_token + attn * (o * p + o * (o - 1) / 2)
    head = 2 * ts.hidden * ts.vocab * (o + 1)
    return vision + prefill + decode + head


def run_side(name: str, root: Path, model: Path, rows_file: Path, backend: str, batch: int, workload: str,
             rows: int, device: str = "cuda", settings: dict[str, dict] | None = None, warmup_rows: int = 0) -> Side:
    """Run the job once over `warmup_rows` + `rows` rows of `rows_file`; `settings` holds a variant's job keys by
    section (see parse_variant). The side's figures count the rows that finished after the first `warmup_rows`
    had: one engine and one run, as a long job has them, so that the timed rows pay nothing a first batch pays
    (compilation, CUDA graph captures, the media workers' start). With engine workers (`engine.gpus` > 1) the
    warm-up is a run of its own, and the timed run's workers load and warm up again (its rates start once they
    have loaded)."""
    cuda = device == "cuda"
    job = _side_job(name, root, model, rows_file, backend, batch, workload, warmup_rows + rows, device, settings)
    devices = job.engine.devices
    if len(devices) > 1:
        if warmup_rows:
            t = time.perf_counter()
            run_job(_side_job(f"{name}-warmup", root, model, rows_file, backend, batch, workload, warmup_rows,
                              device, settings), overwrite=True, progress=False, sync_times=cuda)
            print(f"{name}: warm-up over {warmup_rows} rows took {time.perf_counter() - t:.1f} s", flush=True)
            job = _side_job(name, root, model, rows_file, backend, batch, workload, rows, device, settings,
                            skip=warmup_rows)
        _reset_peak(cuda)
        summary = run_job(job, overwrite=True, progress=False, sync_times=cuda)
        return _measured(name, job, model, rows_file, workload, summary, _peak(cuda))
    if cuda and devices[0] != 0:
        torch.cuda.set_device(devices[0])  # engine.gpus: [k], as run_job does for its own engine
    _reset_peak(cuda)
    start = time.perf_counter()
    engine = build_engine(job, plan_model(job))
    window = _Window(at=time.perf_counter())
    load_s = window.at - start

    def observe(results: list[Result]) -> None:
        if window.done >= warmup_rows:
            window.timed.extend(results)
            window.calls.append(len(results))
            window.last = time.perf_counter()
            return
        window.done += len(results)  # the warm-up ends with the engine call that reaches warmup_rows
        if window.done >= warmup_rows:
            window.at, window.stages = time.perf_counter(), dict(engine.times.seconds)
            print(f"{name}: warm-up over {window.done} rows took {window.at - start:.1f} s (loading {load_s:.1f} s)",
                  flush=True)

    generate = engine.generate

    def timed_generate(requests: list[Request]) -> list[Result]:  # the timed engine calls' wall time, whole
        t = time.perf_counter()
        try:
            return generate(requests)
        finally:
            window.engine_s += (time.perf_counter() - t) if window.done >= warmup_rows else 0.0

    engine.generate = timed_generate
    try:
        summary = run_job(job, overwrite=True, progress=False, sync_times=cuda, engine=engine, observe=observe)
        end = time.perf_counter()
        summary.elapsed_s, summary.load_s = end - window.at + load_s, load_s  # timed: after the warm-up
        peak = _peak(cuda)
    finally:
        engine.close()
    if warmup_rows and not window.timed:
        raise RuntimeError(f"{name}: the warm-up took all {window.done} rows and left none to time (its last engine "
                           f"call reached past --warmup-rows {warmup_rows}): ask for more rows")
    summary.stage_s = {k: v - window.stages.get(k, 0.0) for k, v in summary.stage_s.items()}
    side = _measured(name, job, model, rows_file, workload, summary, peak, window.timed if warmup_rows else None)
    side.calls, side.engine_s, side.close_s = window.calls, window.engine_s, end - window.last
    return side


@dataclass
class _Window:
    """Where a side's timed part begins (run_side): once its warm-up rows have finished."""

    at: float  # time.perf_counter() then
    stages: dict[str, float] = field(default_factory=dict)  # the engine's stage times then
    done: int = 0  # the rows finished by then
    timed: list[Result] = field(default_factory=list)  # the rows that finished after
    calls: list[int] = field(default_factory=list)  # how many of them each engine call returned
    last: float = math.nan  # when the last of them were observed
    engine_s: float = 0.0  # the timed engine calls' wall time


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()


def _peak(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def _side_job(name: str, root: Path, model: Path, rows_file: Path, backend: str, batch: int, workload: str,
              rows: int, device: str, settings: dict[str, dict] | None, skip: int = 0) -> Job:
    """The job of one side over rows [skip, skip + rows) of `rows_file`, writing to root/out-NAME."""
    subset = root / f"rows-{name}.jsonl"
    lines = rows_file.read_text().splitlines()[skip : skip + rows]
    subset.write_text("\n".join(lines) + "\n")
    job_file = root / f"{name}.yaml"
    max_new = WORKLOADS[workload]["max_new_tokens"]
    columns = {"video_column": "video", "image_column": None} if workload == "video" else {"image_column": "image"}
    if workload in PER_ROW_LIMITS:
        columns["max_new_tokens_column"] = "limit"
    spec = {
        "model": str(model), "chat_template": str(root / "short.jinja"),
        "input": {"path": str(subset), "id_column": "id", "prompt_column": "prompt", **columns},
        "output": {"path": str(root / f"out-{name}"), "rows_per_file": 4096},
        "media": {"max_dynamic_patch": 12},
        "generation": {"max_new_tokens": max_new, "ignore_eos": True},
        "engine": {"backend": backend, "device": device, "dtype": "bfloat16" if device == "cuda" else "float32",
                   "max_batch_size": batch},
    }
    for section, values in (settings or {}).items():
        spec.setdefault(section, {}).update(values)
    job_file.write_text(json.dumps(spec))
    return load_job(job_file)


def _measured(name: str, job: Job, model: Path, rows_file: Path, workload: str, summary: Summary, peak: float,
              timed: list[Result] | None = None) -> Side:
    """A side from its run's summary (time after loading, stage times) and peak device memory: its rows, images,
    output tokens and FLOPs over `timed` (None: every row the summary counts)."""
    import pyarrow.parquet as pq

    table = pq.read_table(job.output_dir, columns=["id", "prompt_tokens", "output_tokens", "error"]).to_pylist()
    errors = [r["error"] for r in table if r["error"]]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed, e.g. {errors[0]}")
    if timed is None:
        images, output_tokens = summary.images, summary.output_tokens
    else:
        ids = {r.id for r in timed}
        table = [r for r in table if r["id"] in ids]
        images, output_tokens = sum(r.images for r in timed), sum(r.output_tokens for r in timed)
    ck = CheckpointInfo.read(model)
    tiles = _tiles_of(rows_file, rows_file.stat().st_mtime_ns) if workload != "video" else {r["id"]: 8 for r in table}
    flops = sum(flops_per_row(ck, tiles[r["id"]], r["prompt_tokens"], r["output_tokens"]) for r in table)
    # Rates are over the run after the model has loaded: loading is a one-off, not throughput.
    stages = dict(summary.stage_s, load=summary.load_s)
    return Side(name, len(table), images, output_tokens, summary.elapsed_s - summary.load_s, flops, peak, stages)


@functools.lru_cache(maxsize=4)
def _tiles_of(rows_file: Path, mtime_ns: int) -> dict[str, int]:
    """Each row's tile count, from its image's header: once per bench (every side reads the same rows file; `mtime_ns`
    keeps a rewritten file from being read from the cache)."""
    from PIL import Image

    out = {}
    for line in rows_file.read_text().splitlines():
        row = json.loads(line)
        with Image.open(row["image"]) as im:
            cols, rows = choose_grid(im.width, im.height, 1, 12)
        out[row["id"]] = cols * rows + (1 if cols * rows > 1 else 0)
    return out


def format_sides(sides: list[Side], peak: float) -> str:
    head = ("side | rows | images/s | output tok/s | TFLOP/s | MFU | peak GiB | media wait | vision | prefill | decode "
            "| generate | writing | engine other | close | run s | load s | engine calls (rows each)")
    lines = [f"| {head} |", "|---" * 18 + "|"]
    for s in sides:
        st = s.stages
        tflops = s.flops / s.seconds / 1e12
        cells = [f"{st.get(k, 0):.1f}" for k in ("media wait", "vision", "prefill", "decode", "generate", "writing")]
        other = s.engine_s - sum(st.get(k, 0) for k in ("vision", "prefill", "decode", "generate"))
        cells += ["-" if math.isnan(x) else f"{x:.1f}" for x in (other, s.close_s)]
        lines.append(f"| {s.name} | {s.rows} | {s.images / s.seconds:.2f} | {s.output_tokens / s.seconds:.0f} "
                     f"| {tflops:.0f} | {100 * tflops / peak:.1f}% | {s.peak_gib:.1f} | " + " | ".join(cells)
                     + f" | {s.seconds:.1f} | {st.get('load', 0):.1f} | {calls_cell(s.calls)} |")
    return "\n".join(lines)


def calls_cell(calls: list[int]) -> str:
    """`8 (128)`, or `3 (134-300, mean 211)` where the calls differ: with refill, how many rows each call ran
    through its slots (a call's last rows drain its batch); `-` where not counted (engine workers)."""
    if not calls:
        return "-"
    low, high = min(calls), max(calls)
    rows = f"{low}" if low == high else f"{low}-{high}, mean {sum(calls) / len(calls):.0f}"
    return f"{len(calls)} ({rows})"


def texts_of(out_dir: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    return {r["id"]: r["text"] for r in pq.read_table(out_dir, columns=["id", "text"]).to_pylist()}


def parse_settings(items: Iterable[str]) -> dict[str, dict]:
    """`key=value` items -> {section: {key: value}}, each value read as `batchvl run --set` reads it
    (batchvl.config.load.override_value). A plain key is an engine key; `media.prepare_threads=8` sets another
    section's."""
    sections: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {item!r}")
        section, _, field = key.strip().rpartition(".")
        section = section or "engine"
        sections.setdefault(section, {})[field] = override_value(f"{section}.{field}", value)
    return sections


def parse_variant(text: str) -> tuple[str, dict[str, dict]]:
    """`NAME:key=value,section.key=value` -> (NAME, {section: {key: value}}), as parse_settings reads them."""
    name, _, settings = text.partition(":")
    try:
        return name, parse_settings(filter(None, settings.split(",")))
    except ValueError as e:
        raise ValueError(f"--variant {text!r}: {e}") from None


def bench(shape: str, workload: str, rows: int, batch: int, baseline: str | None, baseline_rows: int,
          baseline_batch: int, workdir: Path | None = None, device: str = "cuda",
          variants: list[str] = (), warmup_rows: int = 0, settings: list[str] = (),
          texts_out: Path | None = None, no_save: bool = False) -> tuple[list[Side], float]:
    """Run the native side, each variant (the native side with other engine settings, its text compared
    with the first's), then the baseline; returns the sides and the matmul peak (TFLOP/s; nan on the CPU).

    With `warmup_rows`, each side's run first goes over that many rows, untimed, and its figures count the rows
    after them, in the same run on the same engine (run_side): a long job pays once for what a first batch costs
    (kernel loading, cuBLAS and cuDNN heuristics, Triton and torch.compile compilation, CUDA graph captures,
    allocator growth, the media workers' start), and the timed rows measure the steady state. (Until session 9
    the warm-up was a run of its own, and the timed run's new engine paid its cache, graph captures and part of
    its compilation again: about 7 s of the 1B shape's 26 s over 1,024 rows, BENCHMARKS.md.) The warm-up time is
    printed. `settings` (KEY=VALUE, as in a variant) apply to every native side, variants on top.
    `texts_out`: write each native side's text by row id there (JSON), to compare runs of two commits.
    `no_save`: write only the shape's configs and tokenizer (no weights) and run every side, the baseline too,
    with `engine.load_format: dummy` (random weights built on the device, of the same spread on both sides):
    for shapes whose weights do not fit the disk. The two sides' weights then differ, so their texts do not
    compare; their speeds do."""
    base = parse_settings(settings)
    baseline_settings: dict[str, dict] = {}  # not `settings`: those are the native engine's
    if no_save:
        base.setdefault("engine", {})["load_format"] = "dummy"
        baseline_settings = {"engine": {"load_format": "dummy"}}

    def native_settings(extra: dict[str, dict] | None = None) -> dict[str, dict]:
        merged = {section: dict(values) for section, values in base.items()}
        for section, values in (extra or {}).items():
            merged.setdefault(section, {}).update(values)
        return merged

    def timed(name: str, backend: str, side_batch: int, side_rows: int, settings: dict | None = None) -> Side:
        return run_side(name, root, model, rows_file, backend, side_batch, workload, side_rows, device, settings,
                        warmup_rows=warmup_rows)

    dev = torch.device(device)
    peak = matmul_peak_tflops(dev) if dev.type == "cuda" else float("nan")
    import transformers

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"bench {shape} / {workload}: {name}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        if no_save:
            model = write_skeleton(shape, root / "model", shapes=SHAPES)
        else:
            model = build_checkpoint(shape, root / "model", dev, dtype, shapes=SHAPES)
        print(weights_line(model, base.get("engine", {}), dev), flush=True)
        data_rows = warmup_rows + max(rows, baseline_rows)
        rows_file = prepare_data(root, workload, data_rows)
        print(f"setup ({'configs' if no_save else 'weights'} + {data_rows} JPEGs): "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        sides = [timed("native", "native", batch, rows, native_settings())]
        print(format_sides(sides, peak), flush=True)
        for text in variants:
            name, extra = parse_variant(text)
            side = timed(name, "native", batch, rows, native_settings(extra))
            first, mine = texts_of(root / "out-native"), texts_of(root / f"out-{name}")
            common = first.keys() & mine.keys()  # all the rows, or (engine workers) those both sides timed
            same = sum(first[i] == mine[i] for i in common)
            sides.append(side)
            print(format_sides([side], peak))
            apart = "" if first.keys() == mine.keys() else f" (the sides wrote {len(first)} and {len(mine)} rows)"
            print(f"variant {name} {extra}: {same}/{len(common)} rows have the native side's text{apart}", flush=True)
        if texts_out is not None:
            texts = {s.name: texts_of(root / f"out-{s.name}") for s in sides}
            texts_out.write_text(json.dumps(texts, ensure_ascii=False, sort_keys=True))
        if baseline:
            sides.append(timed(baseline, baseline, baseline_batch, baseline_rows, baseline_settings))
    return sides, peak


def weights_line(model: Path, engine: dict, device: torch.device) -> str:
    """What the native side's weights will take on the device (bf16 on CUDA, float32 on the CPU), against its
    memory: printed before loading, so a shape that cannot fit says so first."""
    vs, ts, _ = build_specs(CheckpointInfo.read(model))
    fp8 = engine.get("quantization") == "fp8"
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return describe(vs, ts, 2 if device.type == "cuda" else 4, fp8_lm=fp8,
                    fp8_vision=fp8 and bool(engine.get("quantize_vision")), device_bytes=total)


def main(shape: str, workload: str, rows: int, batch: int, baseline: str | None, baseline_rows: int,
         baseline_batch: int, workdir: Path | None, variants: list[str] = (), warmup_rows: int = 0,
         settings: list[str] = (), texts_out: Path | None = None, no_save: bool = False) -> int:
    sides, peak = bench(shape, workload, rows, batch, baseline, baseline_rows, baseline_batch, workdir,
                        variants=variants, warmup_rows=warmup_rows, settings=settings, texts_out=texts_out,
                        no_save=no_save)
    print(format_sides(sides, peak))
    if baseline:
        base = sides[-1].images / sides[-1].seconds
        for side in sides[:-1]:
            print(f"{side.name} / {baseline}: {side.images / side.seconds / base:.2f}x images/s")
    return 0
