"""The served model's CPU side: a chat request's messages become an engine Request exactly as a `batchvl run`
row with `input.messages_column` does (the runner's RowPreparer: plan, fetch, build), and its parameters become
the engine's GenerationParams on top of the job's `generation:` section.

Media is checked before anything is fetched: http(s) and data URIs, and `file://` only under
`allowed_local_media_path`; http(s) hosts on non-public addresses are refused unless `allow_private_media`
(batchvl.media.fetch).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from batchvl.config import Job
from batchvl.core import Request, Result, Row
from batchvl.engine.base import GenerationParams
from batchvl.errors import RowError
from batchvl.media.fetch import Fetcher
from batchvl.media.pixels import tile_media
from batchvl.media.sources import describe, scheme_of
from batchvl.run.loop import fetch_settings, make_preparer, media_tiles
from batchvl.run.plan import Plan, generation_params
from batchvl.serve.protocol import ApiError, Sampling, bad

MESSAGES = "messages"  # the rows' messages column (input.messages_column)


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: Path | None = None  # file:// media only under this folder
    allow_private: bool = False  # http(s) media on loopback, private, link-local ... addresses


class ServedModel:
    """Turns chat messages into engine Requests and request parameters into engine settings."""

    def __init__(self, job: Job, plan: Plan, policy: MediaPolicy):
        self.job, self.plan, self.policy = job, plan, policy
        self.context = plan.checkpoint.max_positions
        self.tokenizer = plan.tokenizer
        # The job's rows, as the server gets them: a messages column. Each request's own limit is checked
        # against the context below, so the preparer leaves room for one new token only.
        generation = dataclasses.replace(job.generation, max_new_tokens=1)
        self.row_job = dataclasses.replace(job, generation=generation,
                                           input=dataclasses.replace(job.input, messages_column=MESSAGES))
        self.preparer = make_preparer(self.row_job, plan)
        self.defaults = generation_params(job, plan)
        self.fetch_settings = dataclasses.replace(fetch_settings(job), allow_private=policy.allow_private)
        # Decoding and tiling in worker processes where `batchvl run` would use them (media_workers: auto, for the
        # native engine on a GPU), so that the engine's thread in this process waits less for the GIL.
        threads, self.tiles = media_tiles(job, self.preparer)
        self._tile = self.tiles.tile if self.tiles is not None else tile_media
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="batchvl-serve-prepare")
        self._fetcher: Fetcher | None = None

    async def prepare(self, messages: list[dict]) -> Request:
        """The engine Request of one conversation; ApiError 400 for anything wrong with it or its media."""
        root = self.policy.allowed_local_path or Path.cwd()
        plan = self.preparer.plan(Row(id="0", source="request", data={MESSAGES: messages}), root)
        if isinstance(plan, Result):
            raise _row_error(plan.error)
        for item in plan.media:
            self.check_reference(item.ref)
        if self._fetcher is None:
            self._fetcher = Fetcher(self.fetch_settings)  # on the server's event loop, where it is used
        fetches = [asyncio.ensure_future(self._fetcher.fetch(m.ref, root)) for m in plan.media]
        try:
            blobs = await asyncio.gather(*fetches)
        except RowError as e:
            raise bad(str(e), "messages", "invalid_image") from None
        finally:
            for f in fetches:
                f.cancel()
        built = await asyncio.get_running_loop().run_in_executor(self.pool, self.preparer.build, plan, blobs,
                                                                 self._tile)
        if isinstance(built, Result):
            raise _row_error(built.error)
        return built

    def check_reference(self, ref: object) -> None:
        """ApiError 400 unless `ref` is an http(s) or data: URL, or a file:// URL under the allowed path."""
        if not isinstance(ref, str):
            raise bad("messages: an image_url's url must be a string", "messages")
        scheme = scheme_of(ref)
        if ref.startswith("data:") or scheme in ("http", "https"):
            return
        if scheme != "file":
            raise bad(f"messages: image URL {describe(ref)}: only http(s), data: and file:// URLs are taken",
                      "messages", "invalid_image")
        allowed = self.policy.allowed_local_path
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(ref).path))
        if allowed is None:
            raise bad("messages: file:// media is refused (the server was started without "
                      "--allowed-local-media-path)", "messages", "invalid_image")
        real = Path(os.path.realpath(path))
        if not path.is_absolute() or not real.is_relative_to(Path(os.path.realpath(allowed))):
            raise bad(f"messages: {describe(ref)} is not under the allowed local media path", "messages",
                      "invalid_image")

    def params(self, sampling: Sampling, prompt_tokens: int) -> tuple[GenerationParams, int]:
        """(the request's group: engine settings with max_new_tokens 0, its own token limit). The job's
        `generation:` settings are the defaults; greedy requests all get the same settings, so they share
        batches. ApiError 400 when the prompt and the limit do not fit the model's context."""
        d, s = self.defaults, sampling
        room = self.context - prompt_tokens
        limit = s.max_tokens if s.max_tokens is not None else min(d.max_new_tokens, room)
        if limit > room:
            raise bad(f"This model's maximum context length is {self.context} tokens. However, you requested "
                      f"{prompt_tokens + limit} tokens ({prompt_tokens} in the messages, {limit} in the "
                      "completion). Please reduce the length of the messages or completion.", "messages",
                      "context_length_exceeded")
        temperature = d.temperature if s.temperature is None else s.temperature
        key = dataclasses.replace(
            d, max_new_tokens=0, temperature=temperature,
            top_p=d.top_p if s.top_p is None else s.top_p,
            top_k=d.top_k if s.top_k is None else s.top_k,
            repetition_penalty=d.repetition_penalty if s.repetition_penalty is None else s.repetition_penalty,
            seed=d.seed if s.seed is None else s.seed,
            stop=d.stop if s.stop is None else s.stop,
            min_new_tokens=d.min_new_tokens if s.min_tokens is None else s.min_tokens,
            ignore_eos=d.ignore_eos if s.ignore_eos is None else s.ignore_eos)
        if key.temperature == 0:  # greedy: the sampling settings do not matter; one group for all
            key = dataclasses.replace(key, top_p=1.0, top_k=0, seed=0)
        if key.min_new_tokens > limit:
            raise bad(f"min_tokens: {key.min_new_tokens} is more than max_tokens ({limit})", "min_tokens")
        return key, limit

    async def close(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.tiles is not None:  # after the queue is cancelled: builds still waiting for a worker fail fast
            self.tiles.close()


def _row_error(error: str | None) -> ApiError:
    text = error or "the request could not be prepared"
    if text.startswith("prompt:"):
        return bad(text, "messages", "context_length_exceeded")
    if text.startswith("internal:"):
        return ApiError(500, text)
    if text.startswith(("media:", "http:", "image:", "video:")):
        return bad(text, "messages", "invalid_image")
    return bad(text, "messages")
