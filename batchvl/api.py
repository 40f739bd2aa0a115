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
import queue
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchvl.config import DTYPES, EngineSpec, GenerationSpec, InputSpec, Job, MediaSpec, OutputSpec, check_job
from batchvl.core import Result, Row
from batchvl.engine import Engine, GenerationParams
from batchvl.engine.stream import TextStream
from batchvl.run.loop import batches_of, build_engine, make_prefetcher, make_preparer, run_batch
from batchvl.run.plan import generation_params, plan_model
from batchvl.vl.inputs import Prompt, is_single, to_messages

log = logging.getLogger(__name__)

MESSAGES = "messages"  # the in-memory rows' messages column


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
class Session:
    """A conversation `Pipeline.chat` carries on: its turns so far, the (prompt, reply) pairs, the last answer."""

    messages: list[dict] = field(default_factory=list)
    history: list[tuple[Any, str]] = field(default_factory=list)
    response: Response | None = None


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
            for response in self._run(conversations, indices, config):
                responses[response.index] = response
        return responses[0] if single else responses

    batch_infer = __call__

    def stream_infer(self, prompts: Prompt | Sequence[Prompt],
                     gen_config: GenerationConfig | Sequence[GenerationConfig] | None = None) -> Iterator[Response]:
        """Answer inputs as `__call__` does, yielding Responses as the text is generated, as LMDeploy's does: each
        holds one input's new text (`index` says which input), its generated token count so far, and on its
        last one its `finish_reason`. An input's pieces joined are the text `__call__` gives it. The native
        engine tells its tokens every `check_every` (8) decode steps; the transformers engine at the end of each
        batch. Generation runs in a thread; leaving the loop early stops it after the batch in flight."""
        items = [prompts] if is_single(prompts) else list(prompts)
        configs = _configs(gen_config, len(items))
        conversations = [to_messages(p) for p in items]
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                for config, indices in _groups(configs):
                    for response in self._run(conversations, indices, config, events, stop):
                        events.put(response)
            except BaseException as e:  # handed to the caller's thread
                events.put(e)
            finally:
                events.put(None)

        thread = threading.Thread(target=work, name="batchvl-stream", daemon=True)
        thread.start()
        streams: dict[int, TextStream] = {}
        try:
            while (event := events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Response):  # an input is done: what is left of its text, and why it ended
                    text = streams[event.index].finish(event.text) if event.index in streams else event.text
                    yield dataclasses.replace(event, text=text)
                    continue
                index, prompt_tokens, ids, params = event
                stream = streams.setdefault(index, TextStream(self.plan.tokenizer, params))
                text = stream.update(ids)
                if text:
                    yield Response(text, len(ids), prompt_tokens, None, index)
        finally:
            stop.set()
            thread.join()

    def chat(self, prompt: str | tuple, session: Session | None = None,
             gen_config: GenerationConfig | None = None) -> Session:
        """One turn of a conversation, as LMDeploy's `chat`: pass the Session it returns back in for the next turn;
        `session.response` is this turn's answer, `session.history` the (prompt, reply) pairs so far. A turn's
        images stay in the conversation, as LMDeploy's do."""
        session = session or Session()
        messages = session.messages + to_messages(prompt)
        response = self(messages, gen_config)
        if response.error is None:
            session.messages = messages + [{"role": "assistant", "content": response.text}]
            session.history.append((prompt, response.text))
        session.response = response
        return session

    def _run(self, conversations: list[list[dict]], indices: list[int], config: GenerationConfig,
             events: queue.Queue | None = None, stop: threading.Event | None = None) -> Iterator[Response]:
        """The inputs `indices` with one config: their Responses, a batch at a time. With `events`, each row's
        tokens so far go there as the engine tells them: (index, prompt tokens, ids, params)."""
        job = dataclasses.replace(self.job, generation=config.to_spec())
        check_job(job)  # the same limits a job file's generation section has
        preparer = make_preparer(job, self.plan)
        params = generation_params(job, self.plan)
        use_params(self.engine, params)
        if events is not None:
            self.engine.on_tokens = lambda r, ids: events.put((int(r.id), len(r.prompt_ids), ids, params))
        origin = Path.cwd() / "pipeline"  # relative media paths are read from the current directory
        rows = ((origin, Row(id=str(i), source=f"pipeline[{i}]", data={MESSAGES: conversations[i]}))
                for i in indices)
        # No worker processes (media.prepare_processes): a call prepares its rows with one prefetcher, and would
        # start them for every call, each re-importing the caller's script.
        prefetcher = make_prefetcher(job, rows, preparer, processes=False)
        try:
            for batch in batches_of(prefetcher, job.engine.max_batch_size):
                if stop is not None and stop.is_set():
                    return
                for result in run_batch(self.engine, batch):
                    yield _response(result, int(result.id))
        finally:
            self.engine.on_tokens = None
            prefetcher.close()

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


__all__ = ["BackendConfig", "GenerationConfig", "Pipeline", "Response", "Session", "pipeline"]
