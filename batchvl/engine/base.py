"""The engine contract, shared by the transformers reference backend and (issue 3) the native one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchvl.core import FINISH_LENGTH, FINISH_STOP, Request, Result
from batchvl.errors import JobError


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()  # the model's (tokenizer and generation config)
    stop_token_ids: tuple[int, ...] = ()  # the job's own, which end a row even with ignore_eos
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    min_new_tokens: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stops(self) -> tuple[int, ...]:
        """Token ids that end a row."""
        ids = self.stop_token_ids if self.ignore_eos else self.eos_token_ids + self.stop_token_ids
        return tuple(dict.fromkeys(ids))

    @property
    def fixed_length(self) -> bool:
        """Whether nothing ends a row before its max_new_tokens: no stop token (ignore_eos, no stop_token_ids) and
        no stop string."""
        return not self.stops and not self.stop


# on_tokens(request, ids): the ids `request` has generated so far (before any stop cut), as the engine learns them
TokenListener = Callable[[Request, list[int]], None]
# arrivals(n, fits): at most n more requests to run in the current call, each one that fits(request) accepts
Arrivals = Callable[[int, Callable[[Request], bool]], list[Request]]


class Engine(ABC):
    """Runs batches of requests.

    Contract: `generate` returns one Result per Request, in the same order. Text excludes special tokens
    and stops at the first stop token; `output_tokens` counts the generated tokens including that stop
    token. A request the engine cannot run becomes a Result with its `error` set, not an exception.

    Two optional hooks, for a server (batchvl.serve) and the streaming Python API, set on the engine between
    calls and called from the thread that runs `generate`:
    - `on_tokens`: told each row's tokens as the engine learns them (see each engine for how often);
    - `arrivals`: an engine that refills finished slots (native, engine.refill) asks it for more requests when
      slots are free; their results follow the given requests' in the returned list, in the order taken.
    """

    max_batch_size: int
    on_tokens: TokenListener | None = None
    arrivals: Arrivals | None = None

    @abstractmethod
    def generate(self, requests: list[Request]) -> list[Result]:
        ...

    def set_params(self, params: GenerationParams) -> None:
        """Use `params` for the next batches."""
        self.params = params

    def out_of_memory(self, rows: int) -> None:  # noqa: B027 - optional hook
        """A batch of `rows` rows ran out of device memory (the run retries it in halves). An engine that keeps
        memory between batches sizes itself down here, so that later batches fit instead of failing the same
        way. The default does nothing."""

    def close(self) -> None:  # noqa: B027 - optional hook, most engines need nothing here
        """Release device memory. The default does nothing."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise JobError("engine.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def finish(tokens: list[int], params: GenerationParams) -> tuple[list[int], str]:
    """Cut generated tokens after the first stop token. Returns (tokens kept, finish reason)."""
    stops = set(params.stops)
    for i, t in enumerate(tokens):
        if t in stops and i + 1 >= params.min_new_tokens:
            return tokens[: i + 1], FINISH_STOP
    return tokens, FINISH_LENGTH


def cut_at_stop_string(tokens: list[int], text: str, params: GenerationParams,
                       tokenizer) -> tuple[list[int], str] | None:
    """If the text holds a stop string: (the tokens up to the one that completed it, the text before it)."""
    hits = [(text.find(s), s) for s in params.stop if s and s in text]
    if not hits:
        return None
    at, stop = min(hits)
    for n in range(1, len(tokens) + 1):
        if stop in tokenizer.decode(tokens[:n], skip_special_tokens=True):
            return tokens[:n], text[:at]
    return tokens, text[:at]


def decode_result(request: Request, tokens: list[int], params: GenerationParams, tokenizer) -> Result:
    """A finished row: text without special tokens, token counts and why it stopped."""
    kept, reason = finish(tokens[: request.max_new_tokens or params.max_new_tokens], params)
    text = tokenizer.decode(kept, skip_special_tokens=True)
    cut = cut_at_stop_string(kept, text, params, tokenizer) if params.stop else None
    if cut is not None:
        (kept, text), reason = cut, FINISH_STOP
    return Result(id=request.id, text=text, error=None, finish_reason=reason,
                  prompt_tokens=len(request.prompt_ids), output_tokens=len(kept), keep=request.keep,
                  images=len(request.tiles_per_image), sample=request.sample, prompt=request.prompt,
                  tile_grids=request.tile_grids)
