"""LMDeploy's InternVL Python API (`pipeline`, `GenerationConfig`, `Response`) over batchvl's own engine.

Moving over means changing the import:

    from batchvl import pipeline, GenerationConfig     # was: from lmdeploy import ...
    from batchvl.vl import load_image                  # was: from lmdeploy.vl import ...

There is no second inference path. Every input becomes a chat-message row, exactly as a `batchvl run` job
with `input.messages_column` reads one: a string is one user turn; a (prompt, image or images) pair is one
user turn whose content is the text part followed by one image part per image; a messages list is used
as it is. The rows are planned, fetched and built by the runner's own RowPreparer and Prefetcher, cut into
batches of `max_batch_size` and run by the engine, so a call gives the same tokens as a job over the same
rows (relative paths are read from the current directory).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from batchvl.config import DTYPES, EngineSpec, GenerationSpec, InputSpec, Job, MediaSpec, OutputSpec, check_job
from batchvl.core import Result, Row
from batchvl.engine import Engine, GenerationParams
from batchvl.run.loop import batches_of, build_engine, make_prefetcher, make_preparer, run_batch
from batchvl.run.plan import generation_params, plan_model
from batchvl.vl.utils import png_bytes

log = logging.getLogger(__name__)

MESSAGES = "messages"  # the in-memory rows' messages column
ImageInput = Image.Image | str | os.PathLike | bytes | dict  # what a pair's image (or list of images) may hold
Prompt = str | tuple | list  # a string, a (prompt, image(s)) pair, or a messages list


@dataclass
class GenerationConfig:
    """Generation settings under LMDeploy's names and defaults.

    As in LMDeploy, decoding is greedy unless `do_sample` is set (and then `top_k=1` or `temperature=0`
    is still greedy); without `do_sample`, `repetition_penalty` is not applied either. With sampling, a
    `random_seed` makes the output reproducible (each input's draws depend only on the seed and its
    position in the call); without one, every call draws a fresh seed. `stop_words` are stop strings: the
    text ends before the first one.
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_new_tokens: int | None = None
    skip_special_tokens: bool = True

    @property
    def sampling(self) -> bool:
        return self.do_sample and self.top_k != 1 and self.temperature > 0

    def to_spec(self) -> GenerationSpec:
        """The equivalent `generation:` section of a job file."""
        if not self.skip_special_tokens:
            raise ValueError("GenerationConfig.skip_special_tokens=False is not supported: batchvl's engines "
                             "always return text without special tokens")
        sample = self.sampling
        seed = self.random_seed
        if seed is None:
            seed = random.getrandbits(32) if sample else 0
        return GenerationSpec(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature if sample else 0.0,
            top_p=self.top_p if sample else 1.0,
            top_k=self.top_k if sample else 0,
            repetition_penalty=self.repetition_penalty if self.do_sample else 1.0,
            seed=seed,
            min_new_tokens=self.min_new_tokens or 0,
            ignore_eos=self.ignore_eos,
            stop=list(self.stop_words or []),
            stop_token_ids=list(self.stop_token_ids or []),
        )


@dataclass
class Response:
    """One input's output. `finish_reason` is `stop`, `length`, or `error` (then `error` says why and
    `text` is empty). Token counts: the prompt with its image context tokens, and the generated tokens
    with the stop token."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None
    index: int = 0
    error: str | None = None


@dataclass
class BackendConfig:
    """The `engine:` section of a job file. LMDeploy's engine configs are read for the same settings."""

    backend: str = "native"
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 8
    max_batch_tokens: int = 0
    trust_remote_code: bool = False

    @classmethod
    def of(cls, config: Any) -> BackendConfig:
        """This class from None, itself, or an LMDeploy-like engine config (TurbomindEngineConfig,
        PytorchEngineConfig): its `max_batch_size`, a `dtype` batchvl knows, `trust_remote_code`. Their
        other settings (tp, session_len, cache sizes, device_type) have no meaning here and are ignored."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        out = cls()
        size = getattr(config, "max_batch_size", None)
        if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
            out.max_batch_size = size
        if getattr(config, "dtype", None) in DTYPES:
            out.dtype = config.dtype
        if isinstance(getattr(config, "trust_remote_code", None), bool):
            out.trust_remote_code = config.trust_remote_code
        return out


@dataclass
class _MemoryInput(InputSpec):
    """A job input whose rows are handed over in memory: there are no files to find."""

    @property
    def files(self) -> list[Path]:
        return []


class Pipeline:
    """A loaded model answering LMDeploy-style inputs. Not thread-safe: one call at a time."""

    def __init__(self, model: str | os.PathLike, backend_config: Any = None, chat_template: str = "auto",
                 media: MediaSpec | None = None):
        backend = BackendConfig.of(backend_config)
        here = str(Path.cwd())
        self.job = Job(
            model=os.fspath(model),
            input=_MemoryInput(path="<memory>", messages_column=MESSAGES, base_dir=here),
            output=OutputSpec(path="."),  # never written: results are returned
            chat_template=chat_template,
            media=media or MediaSpec(),
            generation=GenerationConfig().to_spec(),
            engine=EngineSpec(backend=backend.backend, device=backend.device, dtype=backend.dtype,
                              max_batch_size=backend.max_batch_size, max_batch_tokens=backend.max_batch_tokens,
                              trust_remote_code=backend.trust_remote_code),
            base_dir=here,
        )
        check_job(self.job)
        self.plan = plan_model(self.job)
        self.engine: Engine = build_engine(self.job, self.plan)

    def __call__(self, prompts: Prompt | Sequence[Prompt],
                 gen_config: GenerationConfig | Sequence[GenerationConfig] | None = None) -> Response | list[Response]:
        """Answer one input (a Response) or a list of inputs (a list of Responses, in order).

        `gen_config` may be one config for all inputs or a list with one per input. Inputs that share a
        config run together, in batches of `max_batch_size`.
        """
        single = is_single(prompts)
        items = [prompts] if single else list(prompts)
        configs = _configs(gen_config, len(items))
        conversations = [to_messages(p) for p in items]
        responses: list[Response | None] = [None] * len(items)
        for config, indices in _groups(configs):
            for i, response in zip(indices, self._run(conversations, indices, config), strict=True):
                responses[i] = response
        return responses[0] if single else responses

    batch_infer = __call__

    def _run(self, conversations: list[list[dict]], indices: list[int], config: GenerationConfig) -> list[Response]:
        job = dataclasses.replace(self.job, generation=config.to_spec())
        check_job(job)  # the same limits a job file's generation section has
        preparer = make_preparer(job, self.plan)
        use_params(self.engine, generation_params(job, self.plan))
        origin = Path.cwd() / "pipeline"  # relative media paths are read from the current directory
        rows = ((origin, Row(id=str(i), source=f"pipeline[{i}]", data={MESSAGES: conversations[i]}))
                for i in indices)
        # No worker processes (media.prepare_processes): a call prepares its rows with one prefetcher, and would
        # start them for every call, each re-importing the caller's script.
        prefetcher = make_prefetcher(job, rows, preparer, processes=False)
        try:
            results = [r for batch in batches_of(prefetcher, job.engine.max_batch_size)
                       for r in run_batch(self.engine, batch)]
        finally:
            prefetcher.close()
        return [_response(r, i) for r, i in zip(results, indices, strict=True)]

    def close(self) -> None:
        """Release the model (and its device memory)."""
        self.engine.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pipeline(model: str | os.PathLike, backend_config: Any = None, log_level: str | int = "WARNING",
             **kwargs: Any) -> Pipeline:
    """Load `model` (a checkpoint directory, or a hub name already in the local Hugging Face cache).

    `backend_config`: a BackendConfig, or an LMDeploy engine config (see BackendConfig.of). `log_level`
    applies to batchvl's loggers. Keyword arguments: `chat_template` (auto, none or a .jinja file, as in a
    job file) and the job file's `media:` settings (max_dynamic_patch, video_frames, http_timeout_s, ...).
    """
    logging.getLogger("batchvl").setLevel(log_level)
    chat_template = kwargs.pop("chat_template", "auto")
    media_keys = {f.name for f in dataclasses.fields(MediaSpec)}
    unknown = sorted(set(kwargs) - media_keys)
    if unknown:
        raise TypeError(f"pipeline() got unexpected keyword argument(s) {', '.join(unknown)}; it takes "
                        f"chat_template and the media settings {', '.join(sorted(media_keys))}")
    return Pipeline(model, backend_config, chat_template, MediaSpec(**kwargs))


# ---------------------------------------------------------------------------------------------------------
# Inputs to message rows


def is_single(prompts: Any) -> bool:
    """One input (a string, a pair, a conversation) rather than a list of inputs."""
    return isinstance(prompts, (str, tuple)) or _is_conversation(prompts)


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def to_messages(prompt: Prompt) -> list[dict]:
    """One input as the messages a `messages_column` cell holds. Pillow images become PNG bytes (lossless)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, tuple):
        if len(prompt) != 2 or not isinstance(prompt[0], str):
            raise TypeError("a pair input must be (prompt text, image or list of images)")
        text, images = prompt
        images = list(images) if isinstance(images, (list, tuple)) else [] if images is None else [images]
        parts = [{"type": "text", "text": text}] + [{"type": "image", "image": _reference(im)} for im in images]
        return [{"role": "user", "content": parts}]
    if _is_conversation(prompt):
        return [_message(m) for m in prompt]
    raise TypeError(f"unsupported input {type(prompt).__name__}: expected a string, a (prompt, images) pair, "
                    "a list of messages, or a list of these")


def _message(message: Any) -> Any:
    """A copy of a message (the caller's list is never changed), with Pillow images as PNG bytes."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return dict(message) if isinstance(message, dict) else message  # flatten_messages reports bad ones
    parts = []
    for part in message["content"]:
        if isinstance(part, dict) and part.get("type") == "image":
            part = {**part, "image": _reference(part.get("image"))}
        elif isinstance(part, dict) and part.get("type") == "image_url" and isinstance(part.get("image_url"), dict):
            part = {**part, "image_url": {**part["image_url"], "url": _reference(part["image_url"].get("url"))}}
        parts.append(part)
    return {**message, "content": parts}


def _reference(image: ImageInput) -> Any:
    if isinstance(image, Image.Image):
        return png_bytes(image)
    if isinstance(image, os.PathLike):
        return os.fspath(image)
    return image


def _configs(gen_config: Any, n: int) -> list[GenerationConfig]:
    if gen_config is None or isinstance(gen_config, GenerationConfig):
        return [gen_config or GenerationConfig()] * n
    configs = list(gen_config)
    if len(configs) != n or not all(isinstance(c, GenerationConfig) for c in configs):
        raise ValueError(f"gen_config: expected one GenerationConfig or a list of {n} (one per input)")
    return configs


def _groups(configs: list[GenerationConfig]) -> list[tuple[GenerationConfig, list[int]]]:
    """Input positions grouped by equal config, in order of first appearance."""
    groups: list[tuple[GenerationConfig, list[int]]] = []
    for i, config in enumerate(configs):
        for known, indices in groups:
            if known == config:
                indices.append(i)
                break
        else:
            groups.append((config, [i]))
    return groups


def _response(result: Result, index: int) -> Response:
    if result.error is not None:
        log.warning("input %d failed: %s", index, result.error)
        return Response("", 0, 0, "error", index, result.error)
    return Response(result.text or "", result.output_tokens, result.prompt_tokens, result.finish_reason, index)


# ---------------------------------------------------------------------------------------------------------
# Engine settings per call


def use_params(engine: Engine, params: GenerationParams) -> None:
    """Make the engine's next batches use `params` (a no-op when they already do)."""
    if getattr(engine, "params", None) != params:
        engine.set_params(params)


__all__ = ["BackendConfig", "GenerationConfig", "Pipeline", "Response", "pipeline"]
