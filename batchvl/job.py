"""The job file: one dataclass per section, read from YAML, overridden by `--set`, validated once, here.

Every problem is a `JobError` whose message starts with the dotted key it is about, so the CLI can print it
on one line and exit with code 2. Relative paths are resolved against the folder of the job file.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import os
import types
import typing
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

DECODE_ATTENTION = ("auto", "triton", "sdpa")
BACKENDS = ("native", "transformers")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "float32")
INPUT_SUFFIXES = (".jsonl", ".parquet")


class JobError(ValueError):
    """A problem with the job file. The message names the key: `input.path: no such file: rows.jsonl`."""


@dataclass
class InputSpec:
    path: str
    id_column: str | None = None
    prompt_column: str | None = None
    image_column: str | None = None
    media_root: str | None = None
    max_dynamic_patch_column: str | None = None
    max_new_tokens_column: str | None = None
    messages_column: str | None = None
    video_column: str | None = None
    video_frames_column: str | None = None
    video_bound_column: str | None = None
    # Filled in by load_job from the job file's location; not a key.
    base_dir: str = field(default=".", metadata={"internal": True})

    @cached_property
    def files(self) -> list[Path]:
        """The input files, in a stable order: a file, every .jsonl/.parquet under a directory, or a glob."""
        return _expand_input(self.path, self.base_dir)


@dataclass
class OutputSpec:
    path: str
    keep_columns: list[str] = field(default_factory=list)
    rows_per_file: int = 1000


@dataclass
class MediaSpec:
    max_dynamic_patch: int | None = None  # default: the checkpoint's
    min_dynamic_patch: int | None = None
    use_thumbnail: bool | None = None
    prepare_threads: int = 0  # 0: one per core
    prefetch: int = 64  # rows prepared ahead of the engine, at most
    prefetch_mb: int = 2048  # bytes of fetched and prepared media held ahead, at most
    http_timeout_s: float = 30.0
    http_retries: int = 3
    http_concurrency: int = 64
    max_image_pixels: int = 1 << 28
    video_frames: int = 8
    video_max_dynamic_patch: int = 1


@dataclass
class GenerationSpec:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class EngineSpec:
    backend: str = "native"
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 8
    max_batch_tokens: int = 0  # 0: from free device memory (native backend)
    overlap_vision: bool = False  # native, CUDA, experimental: the next batch's vision runs while this one decodes
    decode_attention: str = "auto"  # native: auto (the Triton kernel on CUDA when triton imports) | triton | sdpa
    compile: bool = True  # native, CUDA: torch.compile the repeated blocks (~20 s once, then ~20% faster)
    trust_remote_code: bool = False
    # auto (every visible GPU), a number of GPUs, or a list of GPU ids: one worker process per GPU when more
    # than one. With device cpu, a number of CPU worker processes (tests, CPU hosts).
    gpus: str | int | list[int] = "auto"

    @cached_property
    def devices(self) -> list[int]:
        """The GPU ids (CUDA ordinals as this process sees them) to run one worker on each; for CPU workers
        (device cpu), 0 .. N-1. One entry means the single in-process engine. Raises JobError."""
        return resolve_gpus(self)


@dataclass
class Job:
    model: str
    input: InputSpec
    output: OutputSpec
    chat_template: str = "auto"
    prompt: str | None = None
    media: MediaSpec = field(default_factory=MediaSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    base_dir: str = field(default=".", metadata={"internal": True})

    def resolve(self, path: str) -> Path:
        """A path from the job file, made absolute against the job file's folder (`~` expanded)."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else Path(self.base_dir) / p

    @cached_property
    def output_dir(self) -> Path:
        return Path(os.path.normpath(self.resolve(self.output.path)))

    def media_root_for(self, input_file: Path) -> Path:
        """`input.media_root`, or else the folder of the input file the row came from."""
        if self.input.media_root is not None:
            return self.resolve(self.input.media_root)
        return input_file.parent


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_job(path: str | os.PathLike, overrides: list[str] = ()) -> Job:
    """Read, override and validate a job file. Raises JobError naming the key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"job: no such file: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise JobError(f"job: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return job_from_mapping({} if raw is None else raw, path.resolve().parent, overrides)


def job_from_mapping(raw: Any, base_dir: str | os.PathLike, overrides: list[str] = ()) -> Job:
    """A job from the mapping a job file holds (relative paths against `base_dir`), overridden and validated
    as `load_job` does. Raises JobError naming the key."""
    if not isinstance(raw, dict):
        raise JobError(f"job: expected a mapping of keys at the top level, got {_type_name(raw)}")
    raw = copy.deepcopy(raw)  # overrides must not change the caller's mapping
    for item in overrides:
        _apply_override(raw, item)
    job = _build(Job, raw, "")
    job.base_dir = str(Path(base_dir).resolve())
    job.input.base_dir = job.base_dir
    check_job(job)
    return job


def _apply_override(raw: dict, item: str) -> None:
    """`--set a.b=value`: the value is read as YAML, so numbers, booleans, null and lists keep their types."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise JobError(f"--set: expected KEY=VALUE, got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise JobError(f"{'.'.join(parts[: depth + 1])}: is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking unknown keys, missing keys and types."""
    where = prefix.rstrip(".") or "job"
    if not isinstance(raw, dict):
        raise JobError(f"{where}: expected a mapping, got {_type_name(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise JobError(f"{prefix}{key}: unknown key (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if no_default:
                raise JobError(f"{key}: missing (required)")
            continue
        kwargs[name] = _convert(hints[name], raw[name], key)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _convert(args[0], value, key)
        for arg in args:  # the first type the value fits (str | int | list[int]: "auto", 2, [0, 1])
            if not _fits(arg, value):
                continue
            return _convert(arg, value, key)
        names = " or ".join(_HINT_NAMES.get(a, str(a)) for a in args)
        raise JobError(f"{key}: expected {names}, got {_type_name(value)} {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise JobError(f"{key}: expected a list, got {_type_name(value)}")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise JobError(f"{key}: expected true or false, got {_type_name(value)} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobError(f"{key}: expected an integer, got {_type_name(value)} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise JobError(f"{key}: expected a number, got {_type_name(value)} {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise JobError(f"{key}: expected a string, got {_type_name(value)} {value!r}")
        return value
    raise TypeError(f"unsupported field type {hint!r} for {key}")  # a bug in this module, not in the job


_HINT_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list[int]: "a list"}


def _fits(hint: Any, value: Any) -> bool:
    if typing.get_origin(hint) is list:
        return isinstance(value, list)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------------------
# Checks that need no model and no data: values, ranges, files that must exist


def check_job(job: Job) -> None:
    """Every check that needs no model and no data (values, ranges, files). Raises JobError."""
    _one_of("engine.backend", job.engine.backend, BACKENDS)
    _one_of("engine.device", job.engine.device, DEVICES)
    _one_of("engine.dtype", job.engine.dtype, DTYPES)
    _at_least("engine.max_batch_size", job.engine.max_batch_size, 1)
    _at_least("output.rows_per_file", job.output.rows_per_file, 1)
    _at_least("generation.max_new_tokens", job.generation.max_new_tokens, 1)
    _at_least("generation.top_k", job.generation.top_k, 0)
    _at_least("generation.min_new_tokens", job.generation.min_new_tokens, 0)
    _at_least("engine.max_batch_tokens", job.engine.max_batch_tokens, 0)
    _one_of("engine.decode_attention", job.engine.decode_attention, DECODE_ATTENTION)
    _ = job.engine.devices  # raises on a bad engine.gpus
    if job.generation.min_new_tokens > job.generation.max_new_tokens:
        raise JobError(f"generation.min_new_tokens: {job.generation.min_new_tokens} is larger than "
                       f"generation.max_new_tokens {job.generation.max_new_tokens}")
    _at_least("media.prepare_threads", job.media.prepare_threads, 0)
    if job.generation.temperature < 0:
        raise JobError(f"generation.temperature: must be >= 0 (0 = greedy), got {job.generation.temperature}")
    if not 0 < job.generation.top_p <= 1:
        raise JobError(f"generation.top_p: must be in (0, 1], got {job.generation.top_p}")
    if job.generation.repetition_penalty <= 0:
        raise JobError(f"generation.repetition_penalty: must be > 0, got {job.generation.repetition_penalty}")
    for key in ("max_dynamic_patch", "min_dynamic_patch"):
        value = getattr(job.media, key)
        if value is not None:
            _at_least(f"media.{key}", value, 1)
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
    for key in ("prefetch", "prefetch_mb", "http_concurrency", "max_image_pixels", "video_frames",
                "video_max_dynamic_patch"):
        _at_least(f"media.{key}", getattr(job.media, key), 1)
    _at_least("media.http_retries", job.media.http_retries, 0)
    if job.media.http_timeout_s <= 0:
        raise JobError(f"media.http_timeout_s: must be > 0, got {job.media.http_timeout_s}")
    if not job.model.strip():
        raise JobError("model: is empty")
    if job.chat_template not in ("auto", "none") and not job.resolve(job.chat_template).is_file():
        raise JobError(f"chat_template: expected auto, none or a .jinja file; no such file: {job.chat_template}")
    if job.input.media_root is not None and not job.resolve(job.input.media_root).is_dir():
        raise JobError(f"input.media_root: no such directory: {job.input.media_root}")
    _ = job.input.files  # raises when the path matches nothing
    if job.output_dir.exists() and not job.output_dir.is_dir():
        raise JobError(f"output.path: exists and is not a directory: {job.output.path}")


def resolve_gpus(engine: EngineSpec) -> list[int]:
    """`engine.gpus` as a list of device ids (see EngineSpec.devices). `auto` is every visible GPU when CUDA is
    there and engine.device is not cpu, else one (the in-process engine). Raises JobError naming the key."""
    gpus = engine.gpus
    if isinstance(gpus, str):
        if gpus != "auto":
            raise JobError(f"engine.gpus: must be auto, a number of GPUs or a list of GPU ids; got {gpus!r}")
    elif isinstance(gpus, int):
        _at_least("engine.gpus", gpus, 1)
    else:
        if not gpus:
            raise JobError("engine.gpus: the list of GPU ids is empty")
        for i, gpu in enumerate(gpus):
            _at_least(f"engine.gpus[{i}]", gpu, 0)
        if len(set(gpus)) != len(gpus):
            raise JobError(f"engine.gpus: GPU ids must be distinct, got {gpus}")
    if engine.device == "cpu":
        if isinstance(gpus, list):
            raise JobError("engine.gpus: a list of GPU ids needs a GPU; with engine.device: cpu give a number of "
                           "CPU worker processes")
        return list(range(1 if gpus == "auto" else gpus))
    import torch  # here, not at the top: reading a job file should not need torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == "auto":
        return list(range(max(visible, 1)))
    wanted = gpus if isinstance(gpus, int) else max(gpus) + 1
    if visible == 0 and (isinstance(gpus, list) or gpus > 1):
        raise JobError(f"engine.gpus: {gpus} asked for, but no CUDA device is visible (for CPU worker processes "
                       "set engine.device: cpu)")
    if visible and wanted > visible:
        raise JobError(f"engine.gpus: {gpus} asked for, but only {visible} GPU(s) are visible")
    return list(range(gpus)) if isinstance(gpus, int) else list(gpus)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise JobError(f"{key}: must be one of {', '.join(choices)}; got {value!r}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise JobError(f"{key}: must be >= {low}, got {value}")


def _expand_input(path: str, base_dir: str) -> list[Path]:
    p = Path(os.path.expanduser(path))
    if not p.is_absolute():
        p = Path(base_dir) / p
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in INPUT_SUFFIXES)
        if not files:
            raise JobError(f"input.path: no .jsonl or .parquet files under directory {path}")
        return files
    if p.is_file():
        if p.suffix not in INPUT_SUFFIXES:
            raise JobError(f"input.path: expected a .jsonl or .parquet file, got {path}")
        return [p]
    if glob.has_magic(str(p)):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).suffix in INPUT_SUFFIXES)
        if not files:
            raise JobError(f"input.path: the pattern {path} matches no .jsonl or .parquet file")
        return files
    raise JobError(f"input.path: no such file or directory: {path}")
