"""The checks of a job that need no model and no data: values, ranges, files that must exist."""

from __future__ import annotations

import os
from pathlib import Path

from batchvl.config.spec import (
    BACKENDS,
    DECODE_ATTENTION,
    DEVICES,
    DTYPES,
    FILE_LIKE_SUFFIXES,
    LOAD_FORMATS,
    OUTPUT_FORMATS,
    QUANTIZATIONS,
    EngineSpec,
    Job,
    Problems,
    at_least,
    at_most,
    is_url,
    local_path,
    one_of,
    path_is,
    shown,
)
from batchvl.errors import JobError

# The largest value each setting takes. Each sizes memory, threads, sockets, processes or a loop before the
# first row, so a value past it (a typo, 1e9) would exhaust the machine rather than run; README "The job file"
# lists them. generation.max_new_tokens is bounded by the model's context when the plan reads the checkpoint.
LIMITS: dict[str, int] = {
    "engine.max_batch_size": 4096,  # rows per engine batch: KV-cache slots, padded tensors
    "output.rows_per_file": 1_000_000,  # rows the writer holds before it writes a part file
    "media.prefetch": 16384,  # rows prepared ahead of the engine
    "media.prefetch_mb": 1 << 20,  # MiB held ahead: 1 TiB
    "media.prepare_threads": 1024,  # threads
    "media.prepare_processes": 256,  # processes, each a Python interpreter (about 60 MB) and two tile slots
    "media.http_concurrency": 1024,  # sockets open at once
    "media.http_retries": 10,  # with exponential backoff: the tenth waits about 2^9 x 0.5 s
    "media.http_timeout_s": 3600,  # seconds per request
    "media.max_image_pixels": 1 << 30,  # an RGB image this large takes 3 GiB decoded
    "media.max_media_mb": 1 << 16,  # MiB of one media item in memory: 64 GiB
    "media.max_dynamic_patch": 256,  # tiles per image (256 tokens each); the grid search grows as its cube
    "media.min_dynamic_patch": 256,
    "media.video_frames": 1024,  # frames per video, each at least one tile; a row's frames column alike
    "media.video_max_dynamic_patch": 256,
    "generation.n": 1024,  # samples per row: output rows, and engine requests sharing the row's prepared media
}


def check_job(job: Job) -> None:
    """Every check that needs no model and no data (values, ranges, files). Raises JobError, or JobErrors naming
    every problem found."""
    p = Problems()
    p.run(check_engine, job.engine)
    p.run(at_least, "output.rows_per_file", job.output.rows_per_file, 1)
    _check_generation(job, p)
    _check_media(job, p)
    if job.prompt is None and job.input.prompt_column is None and job.input.messages_column is None:
        p.add("prompt: missing: set `prompt`, `input.prompt_column` or `input.messages_column`")
    if job.input.messages_column is not None:
        for key in ("prompt_column", "image_column", "video_column"):
            if getattr(job.input, key) is not None:
                p.add(f"input.{key}: not used with input.messages_column (messages carry their own text and "
                      "images); remove one of them")
    if not job.model.strip():
        p.add("model: is empty")
    if job.chat_template not in ("auto", "none") and not path_is(job.resolve(job.chat_template), "is_file"):
        p.add("chat_template: expected auto, none or a .jinja file; no such file: "
              f"{shown(job.chat_template, quote=False)}")
    if job.input.media_root is not None and not path_is(job.resolve(job.input.media_root), "is_dir"):
        p.add(f"input.media_root: no such directory: {shown(job.input.media_root, quote=False)}")
    inputs = p.run(lambda: job.input.files) is not None  # raises when the path matches nothing
    p.run(_check_output, job)
    if inputs:
        p.run(_check_output_outside_input, job)
    check_limits(job, p)
    if isinstance(job.engine.refill, str) and job.engine.refill != "auto":
        p.add(f"engine.refill: must be auto, true or false, got {shown(job.engine.refill)}")
    if not 0 < job.engine.refill_at <= 1:
        p.add(f"engine.refill_at: must be in (0, 1], got {job.engine.refill_at}")
    if not 0 <= job.run.max_error_fraction <= 1:
        p.add(f"run.max_error_fraction: must be in [0, 1], got {job.run.max_error_fraction}")
    p.raise_any()


def _check_generation(job: Job, p: Problems) -> None:
    g = job.generation
    p.run(at_least, "generation.max_new_tokens", g.max_new_tokens, 1)
    p.run(at_least, "generation.top_k", g.top_k, 0)
    p.run(at_least, "generation.min_new_tokens", g.min_new_tokens, 0)
    if g.min_new_tokens > g.max_new_tokens:
        p.add(f"generation.min_new_tokens: {g.min_new_tokens} is larger than generation.max_new_tokens "
              f"{g.max_new_tokens}")
    if g.temperature < 0:
        p.add(f"generation.temperature: must be >= 0 (0 = greedy), got {g.temperature}")
    if not 0 < g.top_p <= 1:
        p.add(f"generation.top_p: must be in (0, 1], got {g.top_p}")
    if g.repetition_penalty <= 0:
        p.add(f"generation.repetition_penalty: must be > 0, got {g.repetition_penalty}")
    p.run(at_least, "generation.n", g.n, 1)
    if 1 < g.n <= LIMITS["generation.n"] and g.temperature == 0:  # past its limit: that is n's one problem
        p.add(f"generation.n: {g.n} samples per row with greedy decoding (generation.temperature 0) would be {g.n} "
              "identical texts; set generation.temperature above 0, or generation.n: 1")


def _check_media(job: Job, p: Problems) -> None:
    m = job.media
    p.run(at_least, "media.prepare_threads", m.prepare_threads, 0)
    if isinstance(m.prepare_processes, str):
        if m.prepare_processes != "auto":
            p.add(f"media.prepare_processes: must be auto or a number of processes, got {shown(m.prepare_processes)}")
    else:
        p.run(at_least, "media.prepare_processes", m.prepare_processes, 0)
    for key in ("max_dynamic_patch", "min_dynamic_patch"):
        value = getattr(m, key)
        if value is not None:
            p.run(at_least, f"media.{key}", value, 1)
    lo, hi = m.min_dynamic_patch, m.max_dynamic_patch
    if lo is not None and hi is not None and lo > hi:
        p.add(f"media.min_dynamic_patch: {lo} is larger than media.max_dynamic_patch {hi}")
    for key in ("prefetch", "prefetch_mb", "http_concurrency", "max_image_pixels", "max_media_mb", "video_frames",
                "video_max_dynamic_patch"):
        p.run(at_least, f"media.{key}", getattr(m, key), 1)
    p.run(at_least, "media.http_retries", m.http_retries, 0)
    if m.http_timeout_s <= 0:
        p.add(f"media.http_timeout_s: must be > 0, got {m.http_timeout_s}")


def _check_output(job: Job) -> None:
    """output.path names a folder of part files, output.format their kind. Raises JobError."""
    one_of("output.format", job.output.format, OUTPUT_FORMATS)
    name = shown(job.output.path, quote=False)
    if path_is(job.output_dir, "exists") and not job.output_dir.is_dir():
        raise JobError(f"output.path: exists and is not a directory: {name}")
    if job.output_dir.name.lower().endswith(FILE_LIKE_SUFFIXES) and not path_is(job.output_dir, "is_dir"):
        raise JobError(f"output.path: {name} looks like a file name, but output.path is the folder the part files "
                       f"go into; name a folder (output.format: {job.output.format} sets the files' kind) and use "
                       "`batchvl export OUT/ -o FILE` for one file")
    if job.output.format == "openai-batch" and job.output.keep_columns:
        raise JobError("output.keep_columns: an OpenAI batch output line has no place for input columns; use "
                       "output.format jsonl or parquet to keep them")
    own = {"sample": "generation.n > 1"} if job.generation.n > 1 else {}
    if job.output.include_prompt:
        own.update(prompt="output.include_prompt", tile_grids="output.include_prompt")
    for i, column in enumerate(job.output.keep_columns):
        if column in own:
            raise JobError(f"output.keep_columns[{i}]: {column!r} is an output column of its own with {own[column]}; "
                           "rename it in the input, or leave it out")


def check_engine(engine: EngineSpec) -> None:
    """The engine section's values, as far as they tell alone (also for tools that take engine settings without
    a job: check-parity). Raises JobError naming the key."""
    p = Problems()
    p.run(one_of, "engine.backend", engine.backend, BACKENDS)
    p.run(one_of, "engine.device", engine.device, DEVICES)
    p.run(one_of, "engine.dtype", engine.dtype, DTYPES)
    p.run(at_least, "engine.max_batch_size", engine.max_batch_size, 1)
    p.run(at_least, "engine.max_batch_tokens", engine.max_batch_tokens, 0)
    p.run(one_of, "engine.decode_attention", engine.decode_attention, DECODE_ATTENTION)
    p.run(_check_quantization, engine)
    p.run(_check_deterministic, engine)
    p.run(lambda: engine.devices)  # raises on a bad engine.gpus
    p.raise_any()


def _check_quantization(engine: EngineSpec) -> None:
    """engine.quantization and quantize_vision, as far as the job alone tells; the device and the checkpoint are
    checked by batchvl.engine.factory.check_quantization. Raises JobError."""
    one_of("engine.quantization", engine.quantization, QUANTIZATIONS)
    if engine.quantization == "fp8" and engine.backend != "native":
        raise JobError(f"engine.quantization: fp8 runs on the native backend only; engine.backend is "
                       f"{shown(engine.backend, quote=False)}")
    one_of("engine.load_format", engine.load_format, LOAD_FORMATS)  # dummy runs on either backend
    if engine.quantize_vision and engine.quantization != "fp8":
        raise JobError(f"engine.quantize_vision: quantizes the vision tower with engine.quantization: fp8; "
                       f"engine.quantization is {shown(engine.quantization, quote=False)}")


def _check_deterministic(engine: EngineSpec) -> None:
    """engine.deterministic runs on the native backend only, with its Triton decode kernel, unquantized."""
    if not engine.deterministic:
        return
    if engine.backend != "native":
        raise JobError(f"engine.deterministic: runs on the native backend only; engine.backend is "
                       f"{shown(engine.backend, quote=False)}")
    if engine.quantization != "none":
        raise JobError("engine.deterministic: has no fp8 kernels yet; use engine.quantization: none with it")
    if engine.decode_attention == "sdpa":
        raise JobError("engine.deterministic: decodes with the Triton kernel (each row over its own keys); "
                       "engine.decode_attention sdpa attends over the batch's span")


def _check_output_outside_input(job: Job) -> None:
    """An output folder inside the input folder (or holding input files) would be read back as input by the
    next run: its part files are Parquet files under input.path. Raises JobError."""
    if is_url(job.input.path):  # read through fsspec: not on this machine's file system
        return
    out = Path(os.path.realpath(job.output_dir))
    inp = job.resolve(local_path(job.input.path))
    roots = [Path(os.path.realpath(inp))] if path_is(inp, "is_dir") else []
    inside = any(out == root or root in out.parents for root in roots) or any(
        out in Path(os.path.realpath(f)).parents for f in job.input.files)
    if inside:
        raise JobError(f"output.path: {shown(job.output.path, quote=False)} is inside the input "
                       f"{shown(job.input.path, quote=False)}: the next run would read its part files back as "
                       "input; choose an output folder outside it")


def check_limits(job: Job, problems: Problems | None = None) -> None:
    """Every setting of LIMITS at most its limit. Raises JobError naming the key, or adds each to `problems`."""
    p = problems or Problems()
    for key, limit in LIMITS.items():
        section, name = key.split(".")
        value = getattr(getattr(job, section), name)
        if value is not None and not isinstance(value, str):  # media.prepare_processes: auto
            p.run(at_most, key, value, limit)
    if problems is None:
        p.raise_any()
