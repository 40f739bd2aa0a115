"""The job file's sections: one dataclass each, with the defaults and the values derived from them.

Reading the file is `batchvl.config.load`; the checks that need neither model nor data are
`batchvl.config.checks`. Every problem is a `JobError` whose message starts with the dotted key it is about.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePath

from batchvl.config.inputs import (  # noqa: F401 (names the other modules take from spec)
    DATA_SUFFIXES,
    FILE_LIKE_SUFFIXES,
    FORMAT_COLUMNS,
    IMAGE_SUFFIXES,
    INPUT_FORMATS,
    INPUT_SUFFIXES,
    OUTPUT_FORMATS,
    VIDEO_SUFFIXES,
    expand_input,
    file_format,
    is_media_file,
)
from batchvl.config.urls import (  # noqa: F401
    InputFile,
    RemoteFile,
    has_pattern,
    is_url,
    local_path,
    plain_root,
    url_root,
)
from batchvl.config.values import (  # noqa: F401
    SHOWN_CHARS,
    Problems,
    absolute_path,
    at_least,
    at_most,
    one_of,
    path_is,
    shown,
)
from batchvl.errors import JobError
from batchvl.host import usable_cores

DECODE_ATTENTION = ("auto", "triton", "sdpa")
BACKENDS = ("native", "transformers")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = ("none", "fp8")
LOAD_FORMATS = ("auto", "dummy")
# media.max_image_pixels by default: Pillow's own decompression-bomb error threshold (2 * PIL.Image.MAX_IMAGE_PIXELS:
# above it Image.open raises DecompressionBombError), not its warning threshold (89,478,485), which 100-megapixel
# camera photos pass. It was 1 << 28 (268,435,456) until issue 15: a PNG of tens of KB declaring 240 megapixels got
# through.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970


@dataclass
class InputSpec:
    path: str
    format: str = "auto"
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
    def files(self) -> list[InputFile]:
        """The input files, in a stable order: a file, every data file under a directory, or a glob's matches
        (see INPUT_FORMATS). A folder of media files is one entry, the folder, walked as it is read; a Hugging
        Face dataset folder is its Arrow files. An fsspec URL's files are RemoteFiles (config.urls)."""
        return expand_input(self.path, self.base_dir, self.format, self.root if is_url(self.path) else None)

    def fill_format_columns(self) -> None:
        """Take the columns of the input's format (FORMAT_COLUMNS) where the job names none; the job file is
        read with them, so the fingerprint records them. Raises JobError for a column an OpenAI batch cannot
        have: its requests carry their own id, messages and limit."""
        formats = self.formats
        if len(formats) != 1 or next(iter(formats)) not in FORMAT_COLUMNS:
            return
        fmt = next(iter(formats))
        if fmt == "openai-batch":
            for key in ("id_column", "messages_column", "max_new_tokens_column", "prompt_column", "image_column",
                        "video_column"):
                if getattr(self, key) is not None:
                    raise JobError(f"input.{key}: not used with input.format openai-batch (each request line "
                                   "carries its custom_id, messages and max_tokens); remove it")
        for key, column in FORMAT_COLUMNS[fmt].items():
            if getattr(self, key) is None:
                setattr(self, key, column)

    def format_of(self, file: InputFile) -> str:
        """The format one of `files` is read in."""
        return file_format(file, self.format)

    @cached_property
    def formats(self) -> set[str]:
        """The formats of the input files (several for a folder mixing JSONL and Parquet, say)."""
        return {self.format_of(f) for f in self.files}

    @cached_property
    def root(self) -> PurePath:
        """The folder that default row ids name input files relative to, fixed by `path` alone so that adding
        files never renames the others: a file's own folder (the id names the file), the directory itself, or
        a glob's or brace pattern's leading folder, before its first wildcard (`data/**/*.jsonl`: `data`). For
        an fsspec URL, the same folder as a path of its filesystem (config.urls)."""
        if is_url(self.path):
            return url_root(self.path)
        p = absolute_path(local_path(self.path), self.base_dir)
        if path_is(p, "is_dir"):
            return p
        if path_is(p, "is_file") or not has_pattern(str(p)):
            return p.parent
        return plain_root(p)


@dataclass
class OutputSpec:
    path: str
    format: str = "parquet"
    keep_columns: list[str] = field(default_factory=list)
    rows_per_file: int = 1000
    include_prompt: bool = False  # the `prompt` and `tile_grids` columns: what the engine got, as preview shows it


@dataclass
class MediaSpec:
    max_dynamic_patch: int | None = None  # default: the checkpoint's
    min_dynamic_patch: int | None = None
    use_thumbnail: bool | None = None
    prepare_threads: int = 0  # 0: one per core; beside worker processes, at least two per process
    # worker processes that decode and tile; 0: none, the threads do it; auto: all cores but two for a native engine
    # on a GPU started from the batchvl command, else none (batchvl.run.loop.media_workers)
    prepare_processes: int | str = "auto"
    prefetch: int = 64  # rows prepared ahead of the engine, at most
    prefetch_mb: int = 2048  # bytes of fetched and prepared media held ahead, at most
    http_timeout_s: float = 30.0
    http_retries: int = 3
    http_concurrency: int = 64
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are refused from their header
    max_media_mb: int = 512  # one media item's bytes in memory (a file, a decompressed body), at most
    video_frames: int = 8
    video_max_dynamic_patch: int = 1
    # false: http(s) media on loopback, private, link-local (cloud metadata) and other non-public addresses is
    # refused (batchvl.media.fetch); `batchvl serve` sets it so for its Batch API's jobs unless told otherwise
    allow_private_addresses: bool = True


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
    n: int = 1  # samples per input row, each an output row with its `sample` index; > 1 needs temperature > 0


@dataclass
class EngineSpec:
    backend: str = "native"
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 8
    max_batch_tokens: int = 0  # 0: from free device memory (native backend)
    decode_attention: str = "auto"  # native: auto (the Triton kernel on CUDA when triton imports) | triton | sdpa
    compile: bool = True  # native, CUDA: torch.compile the repeated blocks (~20 s once, then ~20% faster)
    # native: finished rows' slots take waiting rows while the batch runs on (batchvl.engine.native). auto: on,
    # unless every row runs to one length (ignore_eos, no stop, one max_new_tokens: batchvl.run.loop.refills), where
    # a batch's rows all end on one step. On the H200 the 1B ran caption-natural 52.4 images/s with it against 42.7,
    # mixed 38.8 against 38.1, and caption-7tile (one length) 51.0 against 54.8 (BENCHMARKS.md, session 11).
    refill: bool | str = "auto"
    # native, with refill: waiting rows join the running batch once this share of its slots has finished. Each
    # admission is a vision pass and a prefill: a smaller share keeps the slots fuller and admits more often.
    refill_at: float = 0.25
    trust_remote_code: bool = False
    # native: none, or fp8 (W8A8 e4m3: per-output-channel weight scales, per-token activation scales) for the
    # language model's linear layers; needs a GPU of compute capability 8.9 or newer (batchvl.engine.factory).
    quantization: str = "none"
    quantize_vision: bool = False  # with fp8: the vision tower's linear layers too
    # native, bf16/fp16 only: each vision MLP's first linear layer and its GELU as one cuBLASLt call, whose epilogue
    # computes GELU's tanh approximation (InternViT is trained with exact GELU). 7% faster vision on the H200, and
    # the tower's error against float32 exact GELU is the same as exact GELU's in bf16 (BENCHMARKS.md, session 6).
    # float32 always runs exact GELU: there the approximation would be larger than the dtype's rounding.
    fused_vision_gelu: bool = True
    # native: each row's output independent of the batch it ran in (batch-invariant Triton kernels, per-row prefill
    # attention, fixed-size vision passes; torch.compile off). Needs a CUDA GPU; not with fp8 (issue 21).
    deterministic: bool = False
    # native, CUDA graphs on: the whole decode step (model, sampling, bookkeeping) as one graph, captured once per batch
    # size (batchvl.engine.state). Off by default: on, it measured +3.6% on the 1B shape and -1.8% on the 8B
    # (BENCHMARKS.md, session 9), within what separates two runs.
    step_graph: bool = False
    # For benchmarks: auto (read the checkpoint's weights) or dummy (no weight files are read; every parameter
    # is filled with seeded random values on the device, as vLLM's --load-format dummy does). Either backend;
    # the transformers one needs a transformers-layout checkpoint for it (batchvl.engine.hf).
    load_format: str = "auto"
    # auto (every visible GPU), a number of GPUs, or a list of GPU ids: one worker process per GPU when more
    # than one. With device cpu, a number of CPU worker processes (tests, CPU hosts).
    gpus: str | int | list[int] = "auto"

    @cached_property
    def devices(self) -> list[int]:
        """The GPU ids (CUDA ordinals as this process sees them) to run one worker on each; for CPU workers
        (device cpu), 0 .. N-1. One entry means the single in-process engine. Raises JobError."""
        return resolve_gpus(self)


@dataclass
class RunSpec:
    # `batchvl run` exits with code 3 when more than this share of the output folder's rows failed, and always when
    # every row did (README "Exit codes"). 0.1: a captioning set tolerates a few broken images or URLs; beyond a
    # tenth, the cause is most likely the job's (a wrong media_root, a prompt field) and a script should stop.
    max_error_fraction: float = 0.1


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
    run: RunSpec = field(default_factory=RunSpec)
    base_dir: str = field(default=".", metadata={"internal": True})

    def resolve(self, path: str) -> Path:
        """A path from the job file, made absolute against the job file's folder (`~` expanded)."""
        return absolute_path(path, self.base_dir)

    @cached_property
    def output_dir(self) -> Path:
        return Path(os.path.normpath(self.resolve(self.output.path)))

    def media_root_for(self, input_file: InputFile) -> Path | str:
        """`input.media_root`, or else the folder of the input file the row came from (the URL of its folder
        for a file read through fsspec: relative media references are read from beside it)."""
        if self.input.media_root is not None:
            return self.resolve(self.input.media_root)
        return input_file.folder if isinstance(input_file, RemoteFile) else input_file.parent


def resolve_gpus(engine: EngineSpec) -> list[int]:
    """`engine.gpus` as a list of device ids (see EngineSpec.devices). `auto` is every visible GPU when CUDA is
    there and engine.device is not cpu, else one (the in-process engine). Raises JobError naming the key."""
    gpus = engine.gpus
    if isinstance(gpus, str):
        if gpus != "auto":
            raise JobError(f"engine.gpus: must be auto, a number of GPUs or a list of GPU ids; got {shown(gpus)}")
    elif isinstance(gpus, int):
        at_least("engine.gpus", gpus, 1)
    else:
        if not gpus:
            raise JobError("engine.gpus: the list of GPU ids is empty")
        for i, gpu in enumerate(gpus):
            at_least(f"engine.gpus[{i}]", gpu, 0)
        if len(set(gpus)) != len(gpus):
            raise JobError(f"engine.gpus: GPU ids must be distinct, got {shown(gpus)}")
    if engine.device == "cpu":
        if isinstance(gpus, list):
            raise JobError("engine.gpus: a list of GPU ids needs a GPU; with engine.device: cpu give a number of "
                           "CPU worker processes")
        workers = 1 if gpus == "auto" else gpus
        if workers > max_cpu_workers():
            raise JobError(f"engine.gpus: {workers} CPU worker processes asked for (engine.device: cpu), but at most "
                           f"{max_cpu_workers()} may run here: one per CPU core ({usable_cores()}), or 4 on a "
                           "machine with fewer")
        return list(range(workers))
    import torch  # here, not at the top: reading a job file should not need torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == "auto":
        return list(range(max(visible, 1)))
    wanted = gpus if isinstance(gpus, int) else max(gpus) + 1
    if visible == 0 and (isinstance(gpus, list) or gpus > 1):
        raise JobError(f"engine.gpus: {shown(gpus)} asked for, but no CUDA device is visible (for CPU worker processes "
                       "set engine.device: cpu)")
    if visible and wanted > visible:
        raise JobError(f"engine.gpus: {shown(gpus)} asked for, but only {visible} GPU(s) are visible")
    return list(range(gpus)) if isinstance(gpus, int) else list(gpus)


def max_cpu_workers() -> int:
    """The most CPU worker processes `engine.gpus` may start with engine.device: cpu: one per core (more would
    only share the same cores, each with its own copy of the model), but 4 on a machine with fewer cores."""
    return max(usable_cores(), 4)
