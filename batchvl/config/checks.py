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
    at_least,
    at_most,
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
}


def check_job(job: Job) -> None:
    """Every check that needs no model and no data (values, ranges, files). Raises JobError."""
    check_engine(job.engine)
    at_least("output.rows_per_file", job.output.rows_per_file, 1)
    at_least("generation.max_new_tokens", job.generation.max_new_tokens, 1)
    at_least("generation.top_k", job.generation.top_k, 0)
    at_least("generation.min_new_tokens", job.generation.min_new_tokens, 0)
    if job.generation.min_new_tokens > job.generation.max_new_tokens:
        raise JobError(f"generation.min_new_tokens: {job.generation.min_new_tokens} is larger than "
                       f"generation.max_new_tokens {job.generation.max_new_tokens}")
    at_least("media.prepare_threads", job.media.prepare_threads, 0)
    at_least("media.prepare_processes", job.media.prepare_processes, 0)
    if job.generation.temperature < 0:
        raise JobError(f"generation.temperature: must be >= 0 (0 = greedy), got {job.generation.temperature}")
    if not 0 < job.generation.top_p <= 1:
        raise JobError(f"generation.top_p: must be in (0, 1], got {job.generation.top_p}")
    if job.generation.repetition_penalty <= 0:
        raise JobError(f"generation.repetition_penalty: must be > 0, got {job.generation.repetition_penalty}")
    for key in ("max_dynamic_patch", "min_dynamic_patch"):
        value = getattr(job.media, key)
        if value is not None:
            at_least(f"media.{key}", value, 1)
    lo, hi = job.media.min_dynamic_patch, job.media.max_dynamic_patch
    if lo is not None and hi is not None and lo > hi:
        raise JobError(f"media.min_dynamic_patch: {lo} is larger than media.max_dynamic_patch {hi}")
    if job.prompt is None and job.input.prompt_column is None and job.input.messages_column is None:
        raise JobError("prompt: missing: set `prompt`, `input.prompt_column` or `input.messages_column`")
    if job.input.messages_column is not None:
        for key in ("prompt_column", "image_column", "video_column"):
            if getattr(job.input, key) is not None:
                raise JobError(f"input.{key}: not used with input.messages_column (messages carry their own "
                               "text and images); remove one of them")
    for key in ("prefetch", "prefetch_mb", "http_concurrency", "max_image_pixels", "max_media_mb", "video_frames",
                "video_max_dynamic_patch"):
        at_least(f"media.{key}", getattr(job.media, key), 1)
    at_least("media.http_retries", job.media.http_retries, 0)
    if job.media.http_timeout_s <= 0:
        raise JobError(f"media.http_timeout_s: must be > 0, got {job.media.http_timeout_s}")
    if not job.model.strip():
        raise JobError("model: is empty")
    if job.chat_template not in ("auto", "none") and not path_is(job.resolve(job.chat_template), "is_file"):
        raise JobError("chat_template: expected auto, none or a .jinja file; no such file: "
                       f"{shown(job.chat_template, quote=False)}")
    if job.input.media_root is not None and not path_is(job.resolve(job.input.media_root), "is_dir"):
        raise JobError(f"input.media_root: no such directory: {shown(job.input.media_root, quote=False)}")
    _ = job.input.files  # raises when the path matches nothing
    _check_output(job)
    _check_output_outside_input(job)
    check_limits(job)


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


def check_engine(engine: EngineSpec) -> None:
    """The engine section's values, as far as they tell alone (also for tools that take engine settings without
    a job: check-parity). Raises JobError naming the key."""
    one_of("engine.backend", engine.backend, BACKENDS)
    one_of("engine.device", engine.device, DEVICES)
    one_of("engine.dtype", engine.dtype, DTYPES)
    at_least("engine.max_batch_size", engine.max_batch_size, 1)
    at_least("engine.max_batch_tokens", engine.max_batch_tokens, 0)
    one_of("engine.decode_attention", engine.decode_attention, DECODE_ATTENTION)
    _check_quantization(engine)
    _ = engine.devices  # raises on a bad engine.gpus


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


def _check_output_outside_input(job: Job) -> None:
    """An output folder inside the input folder (or holding input files) would be read back as input by the
    next run: its part files are Parquet files under input.path. Raises JobError."""
    out = Path(os.path.realpath(job.output_dir))
    inp = job.resolve(job.input.path)
    roots = [Path(os.path.realpath(inp))] if path_is(inp, "is_dir") else []
    inside = any(out == root or root in out.parents for root in roots) or any(
        out in Path(os.path.realpath(f)).parents for f in job.input.files)
    if inside:
        raise JobError(f"output.path: {shown(job.output.path, quote=False)} is inside the input "
                       f"{shown(job.input.path, quote=False)}: the next run would read its part files back as "
                       "input; choose an output folder outside it")


def check_limits(job: Job) -> None:
    """Every setting of LIMITS at most its limit. Raises JobError naming the key."""
    for key, limit in LIMITS.items():
        section, name = key.split(".")
        value = getattr(getattr(job, section), name)
        if value is not None:
            at_most(key, value, limit)
