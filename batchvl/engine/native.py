"""The native engine: batchvl's own InternVL models in static batches over a preallocated KV cache.

A batch runs as:
1. the vision encoder over all tiles of all rows, in chunks of `vision_chunk` tiles;
2. (the projector is part of the encoder) the image embeddings placed at the `<IMG_CONTEXT>` positions;
3. prefill over the right-padded prompts, with the LM head only at each row's last token;
4. decode: one token per row per step at the row's own position, sampling on the device, until every row
   has stopped or reached max_new_tokens. The loop looks at the host only every `check_every` steps.

The batch's state is a BatchState (state.py) and prefill and decode are its steps; the KV cache, its span
policy and the decode graphs are the ModelRunner's (model_runner.py); the vision pass is the VisionRunner's
(vision.py). This module runs the loop.
"""

from __future__ import annotations

import functools
import gc
import logging
from collections import deque

import torch

from batchvl.core import Request, Result
from batchvl.engine.base import Engine, GenerationParams, decode_result, pick_device, pick_dtype
from batchvl.engine.compile import COMPILED_MIN_ROWS, compile_model
from batchvl.engine.memory import plan_memory
from batchvl.engine.model_runner import ModelRunner, prefill_chunks
from batchvl.engine.sampler import Sampler
from batchvl.engine.state import BatchState
from batchvl.engine.timing import StageTimes
from batchvl.engine.vision import VisionRunner
from batchvl.media.normalize import normalize_uint8
from batchvl.models.checkpoint import CheckpointInfo
from batchvl.models.decoder import KVCache
from batchvl.models.fp8 import use_activation_quantizer
from batchvl.models.loader import load_model
from batchvl.prepare.prompt import IMG_CONTEXT

log = logging.getLogger(__name__)


def _decode_kernel(choice: str, device: torch.device, ordered: bool = False):
    """The decode-attention function for `engine.decode_attention`: the Triton kernel, or None for SDPA.
    `auto` takes the kernel on CUDA when triton imports; `triton` insists (on the CPU only under
    TRITON_INTERPRET=1, which tests use). `ordered`: its splits merged in order (the deterministic mode: a row's
    result independent of the cache's span)."""
    if choice == "sdpa" or (choice == "auto" and device.type != "cuda"):
        return None
    try:
        from batchvl.kernels import decode_attention
    except ImportError as e:
        if choice == "triton":
            raise RuntimeError(f"engine.decode_attention: triton is not importable ({e})") from e
        log.info("triton is not importable (%s): decode attention runs through SDPA", e)
        return None
    return functools.partial(decode_attention, ordered=True) if ordered else decode_attention


def _fp8_activation_kernel(device: torch.device):
    """The fused per-token fp8 quantization kernel (batchvl.kernels.fp8_quant) on CUDA, or None: the Fp8Linear
    layers then quantize their inputs with the eager torch reference, which is correct but slow (issue 16's
    probe: it takes away most of fp8's gain)."""
    if device.type != "cuda":
        return None
    try:
        from batchvl.kernels.fp8_quant import quantize_fp8_per_token
    except ImportError as e:
        log.warning("the fp8 activation kernel is not importable (%s): activations are quantized in eager torch, "
                    "slowly", e)
        return None
    return quantize_fp8_per_token


def _make_deterministic(model) -> tuple[str, bool, bool]:
    """`engine.deterministic`: each row's output independent of its batch. The linear layers, norms, LM head and
    the patch embedding run the batch-invariant kernels (batchvl.models.invariant); prefill attends per row over
    the row's own length; decode uses the Triton kernel (a row reads its own keys; its splits merged in order,
    see _decode_kernel); the vision chunks are padded to a fixed size (VisionRunner), so the tower's
    attention always runs one shape. CUDA graphs keep working (they replay the same kernels); torch.compile is
    off (inductor's fused norms split their sums by the number of rows), and so is the fused vision GELU (a cuBLAS
    call). Returns the decode-attention choice, fused_vision_gelu and compile to use."""
    from batchvl.models.invariant import make_batch_invariant, prefill_attention_per_row

    make_batch_invariant(model)  # the device was checked where the engine is built (factory.check_deterministic)
    model.lm.prefill_attention = prefill_attention_per_row
    return "triton", False, False


def by_length(requests: list[Request]) -> list[int]:
    """The order in which a batch's rows take its slots: by prompt length, shortest first. Prefill runs the slots
    in chunks of consecutive rows, each padded only to its own longest prompt (ModelRunner.prefill), so rows of
    like length side by side pad least: 1B `mixed` rows hold 1 to 13 tiles, and in input order nearly every chunk
    was padded to the batch's longest prompt. A row's slot changes nothing else it computes."""
    return sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))


def inverse(order: list[int]) -> list[int]:
    """The inverse of a permutation: where each of 0 .. n-1 stands in `order`."""
    back = [0] * len(order)
    for at, i in enumerate(order):
        back[i] = at
    return back


class NativeEngine(Engine):
    def __init__(self, checkpoint: CheckpointInfo, tokenizer, params: GenerationParams, device: str = "auto",
                 dtype: str = "auto", max_batch_size: int = 8, max_batch_tokens: int = 0,
                 vision_chunk: int = 64, check_every: int = 8, cuda_graphs: bool = True,
                 prefill_tokens: int = 65536, decode_attention: str = "auto", compile: bool = True,
                 quantization: str = "none", quantize_vision: bool = False, load_format: str = "auto",
                 refill: bool | str = False, fused_vision_gelu: bool = True, deterministic: bool = False,
                 step_graph: bool = False, refill_at: float = 0.25):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = tokenizer
        self.params = params
        self.max_batch_size = max_batch_size
        self.vision_chunk = vision_chunk
        self.prefill_tokens = prefill_tokens
        self.check_every = check_every
        self.refill = refill  # True, False or "auto" (_refills)
        self.refill_at = refill_at  # waiting rows join once this share of the slots has finished (engine.refill_at)
        self.step_graph = step_graph
        log.info("loading %s natively (%s, %s%s%s)", checkpoint.path, self.device, self.dtype,
                 "" if quantization == "none" else f", {quantization}" + (" with vision" if quantize_vision else ""),
                 ", random weights (load_format dummy)" if load_format == "dummy" else "")
        loaded = load_model(checkpoint, self.device, self.dtype, quantization, quantize_vision, load_format)
        self.model, self.vision_spec, self.text_spec = loaded.model, loaded.vision, loaded.text
        # aligned rows for the head's product on the GPU (DecoderLM.pad_head); the CPU's BLAS has no such need
        self.model.lm.pad_head(64 if self.device.type == "cuda" else 1)
        self.deterministic = deterministic
        if deterministic:  # see _make_deterministic
            decode_attention, fused_vision_gelu, compile = _make_deterministic(self.model)
        self.model.lm.attention_kernel = _decode_kernel(decode_attention, self.device, ordered=deterministic)
        for block in self.model.vision.vit.blocks:  # see EngineSpec.fused_vision_gelu: 16-bit dtypes only
            block.fused_gelu = fused_vision_gelu and self.dtype in (torch.bfloat16, torch.float16)
        if quantization == "fp8":
            use_activation_quantizer(self.model, _fp8_activation_kernel(self.device))
        self.compiled = compile and self.device.type == "cuda"  # on the CPU, compiling costs more than it saves
        if self.compiled:
            compile_model(self.model)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.pad_id = 0
        self.set_params(params)
        self.max_batch_tokens = max_batch_tokens or self._plan_memory()
        self.times = StageTimes()
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # a pass of fewer tiles is padded: to a whole chunk in the deterministic mode (one shape for every pass), to
        # COMPILED_MIN_ROWS for a compiled tower (no recompilation for one); see VisionRunner
        min_rows = COMPILED_MIN_ROWS if self.compiled else 1
        min_tiles = vision_chunk if deterministic else min_rows
        self.vision = VisionRunner(self._vision_pass, self.device, vision_chunk, self.cuda_graphs, min_tiles)
        self.runner = ModelRunner(self.model.lm, self.device, self.dtype, max_batch_size, self.max_batch_tokens,
                                  self.image_token_id, self.cuda_graphs, min_rows)
        self.first_step_logits: list[torch.Tensor] | None = None  # set to [] to collect them (parity checks)
        self.last_tokens: list[list[int]] = []  # the last batch's generated ids, before any stop cut

    def set_params(self, params: GenerationParams) -> None:
        """Use `params` for the next batches (the pipeline API changes them per call)."""
        self.params = params
        self.sampler = Sampler(params, vocab=self.text_spec.vocab)
        self.stops = torch.tensor(params.stops or (-1,), device=self.device)
        self.eos_block = torch.tensor([t for t in params.stops if 0 <= t < self.text_spec.vocab] or [0],
                                      device=self.device)

    def _plan_memory(self) -> int:
        """Tokens (prompt + output, summed over rows) one batch may hold: the KV cache's share of the memory left
        after the weights, once one prefill chunk's and one vision chunk's activations are counted; the prefill
        chunk is cut where a large model's would not fit (batchvl.engine.memory)."""
        if self.device.type != "cuda":
            return 1 << 20
        free, _ = torch.cuda.mem_get_info(self.device)
        size = torch.empty((), dtype=self.dtype).element_size()
        plan = plan_memory(free, self.text_spec, self.vision_spec, size, self.prefill_tokens, self.vision_chunk)
        if plan.prefill_tokens < self.prefill_tokens:
            log.info("prefill runs in chunks of %d tokens (not %d): their activations fit in what the weights "
                     "leave", plan.prefill_tokens, self.prefill_tokens)
        self.prefill_tokens = plan.prefill_tokens
        tokens = max(plan.cache_bytes // KVCache.bytes_per_token(self.text_spec, self.dtype), 4096)
        log.info("memory: %.1f GB free after the weights; KV cache %.1f GB (%d tokens), activations %.1f GB",
                 free / 1e9, plan.cache_bytes / 1e9, tokens, plan.activation_bytes / 1e9)
        return tokens

    # -----------------------------------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run requests; results keep the request order. With refill (engine.refill), more requests than the
        batch has slots run in one batch whose finished slots take the waiting rows (`_run_refilling`);
        without, in static sub-batches that fit the token budget."""
        if self._refills(requests) and (len(requests) > 1 or self.arrivals is not None):
            return self._run_refilling(requests)
        results: list[Result] = []
        for chunk in self._split(requests):
            results.extend(self._run(chunk))
        return results

    def _refills(self, requests: list[Request]) -> bool:
        """engine.refill for a call of `requests`. auto refills unless every row runs to one length (nothing ends a
        row sooner, GenerationParams.fixed_length, and one max_new_tokens for all) and no arrivals can join: the
        rows of a batch then end on one step, and a static batch is faster (caption-7tile on the H200: 54.8 images/s
        static against 51.0 with refill, BENCHMARKS.md, session 11)."""
        if self.refill != "auto":
            return bool(self.refill)
        limits = {r.max_new_tokens or self.params.max_new_tokens for r in requests}
        return self.arrivals is not None or not (self.params.fixed_length and len(limits) == 1)

    def _split(self, requests: list[Request]) -> list[list[Request]]:
        """Consecutive sub-batches of at most max_batch_size rows whose (longest prompt + max_new_tokens) x rows fit
        max_batch_tokens."""
        needs = [len(r.prompt_ids) + self.params.max_new_tokens for r in requests]
        return [requests[a:b] for a, b, _ in prefill_chunks(needs, self.max_batch_tokens, self.max_batch_size)]

    @torch.inference_mode()
    def _run(self, requests: list[Request]) -> list[Result]:
        with self.times.stage("decode"):  # decode's set-up: the cache, and its graphs when it is new
            state = self.start(len(requests), max(len(r.prompt_ids) for r in requests) + self.params.max_new_tokens)
        order = by_length(requests)  # slot i runs requests[order[i]]: see by_length
        rows = [requests[i] for i in order]
        with self.times.stage("vision"):
            features = self.vision.compute(rows)
        with self.times.stage("prefill"):
            logits = state.fill(rows, features)  # [B, V]: every row's first token is taken
        back = inverse(order)  # request i ran in slot back[i]
        if self.first_step_logits is not None:
            self.first_step_logits.append(logits[back].cpu())
        with self.times.stage("decode"):
            for step in range(1, state.max_limit):
                if step % self.check_every == 0:
                    done = state.sync(self._stop_hit())  # the loop's only host sync
                    self._tell(state)
                    if done:
                        break
                state.decode()
        generated = state.generated()
        self.last_tokens = [generated[slot] for slot in back]
        return [decode_result(r, row, self.params, self.tokenizer)
                for r, row in zip(requests, self.last_tokens, strict=True)]

    @torch.inference_mode()
    def _run_refilling(self, requests: list[Request]) -> list[Result]:
        """One batch of as many slots as the budget allows, for all of `requests`: the first rows fill it, and
        whenever at least `refill_at` of its slots have finished (or all have), the waiting rows take them,
        prefilled into the free slots while the others keep their state; then decoding goes on. A static batch
        would run until its longest row is done while the finished rows' slots sit idle.

        Rows are independent of their slot and of the step they join at (BatchState), so each row generates
        what it generates alone: token for token in float32 (tests/test_refill.py). The cache's span covers
        the longest row of all the requests. Results come back together, in request order: a failure (out of
        memory) loses none of them, as the caller reruns them all."""
        p = self.params
        requests = list(requests)  # arrivals join it
        need = max(len(r.prompt_ids) + (r.max_new_tokens or p.max_new_tokens) for r in requests)
        rows = len(requests) if self.arrivals is None else self.max_batch_size  # arrivals may fill the rest
        slots = max(1, min(self.max_batch_size, rows, self.max_batch_tokens // need))
        with self.times.stage("decode"):
            state = self.start(slots, need)
        waiting = deque(range(len(requests)))
        holder: list[int | None] = [None] * slots  # the request index each slot runs, None when free
        tokens: list[list[int] | None] = [None] * len(requests)
        stop_hit = self._stop_hit()
        self._admit(state, holder, list(range(slots)), waiting, requests)
        while True:
            with self.times.stage("decode"):
                for _ in range(self.check_every):
                    state.decode()
                done = state.finished(stop_hit)  # the host learns which rows are done: one synchronisation
                self._tell(state)
                finished = [s for s, i in enumerate(holder) if i is not None and done[s]]
                if finished:
                    for s, ids in zip(finished, state.out[finished, : state.width].tolist(), strict=True):
                        tokens[holder[s]] = ids
                        holder[s] = None
            free = [s for s, i in enumerate(holder) if i is None]
            if not waiting and len(free) == slots:
                break
            due = len(free) >= self.refill_at * slots
            if self.arrivals is not None and due and len(waiting) < len(free):
                for request in self.arrivals(len(free) - len(waiting), state.fits):
                    waiting.append(len(requests))
                    requests.append(request)
                    tokens.append(None)
            if waiting and due:  # all free counts too
                self._admit(state, holder, free, waiting, requests)
        self.last_tokens = tokens
        return [decode_result(r, row, p, self.tokenizer) for r, row in zip(requests, tokens, strict=True)]

    def _tell(self, state: BatchState) -> None:
        """Hand each filled slot's tokens so far to `on_tokens`: one more device read, only when it is set."""
        if self.on_tokens is None:
            return
        counts = state.count.tolist()
        rows = state.out[:, : max(counts, default=0)].tolist()
        for request, row, n in zip(state.requests, rows, counts, strict=True):
            if request is not None and n:
                self.on_tokens(request, row[:n])

    def _admit(self, state: BatchState, holder: list[int | None], free: list[int], waiting: deque[int],
               requests: list[Request]) -> None:
        """Prefill waiting rows, in order, into the `free` slots (ascending): one vision pass and one prefill
        for all of them, their keys and values written into their own slots, adjacent or not."""
        taken = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        order = by_length([requests[i] for i in taken])
        rows = [requests[taken[i]] for i in order]  # by length, into the free slots in order (see by_length)
        with self.times.stage("vision"):
            features = self.vision.compute(rows)
        with self.times.stage("prefill"):
            logits = state.admit_rows(free[: len(rows)], rows, features)
        if self.first_step_logits is not None:  # in the order the rows were waiting
            self.first_step_logits.append(logits[inverse(order)].cpu())
        for slot, i in zip(free, order, strict=False):  # fewer rows than free slots at the end
            holder[slot] = taken[i]

    def out_of_memory(self, rows: int) -> None:
        """After a batch of `rows` rows ran out of memory: run at most half as many rows at once from now on
        (`generate` cuts larger batches), and free the KV cache and its graphs, which were sized for the larger
        batch and would otherwise keep the memory the smaller batches need."""
        self.max_batch_size = max(1, min(self.max_batch_size, rows) // 2)
        self.runner.release(self.max_batch_size)
        log.warning("the native engine now runs at most %d rows at once (engine.max_batch_size), after running "
                    "out of device memory on %d", self.max_batch_size, rows)

    def start(self, slots: int, need: int) -> BatchState:
        """An empty batch of `slots` slots whose rows need up to `need` positions (prompt + new tokens): the
        cache is reserved (and the decode graphs captured, when it is new) here."""
        cache, span = self.runner.reserve(slots, need)
        return BatchState(self.runner, self.sampler, self.params, slots, cache, span, self.stops, self.eos_block,
                          self.pad_id, self.prefill_tokens, self.step_graph)

    def _stop_hit(self):
        """A test of one row's ids for the stop strings, or None when there are none."""
        if not self.params.stop:
            return None
        stops, decode = self.params.stop, self.tokenizer.decode
        return lambda ids: any(s in decode(ids, skip_special_tokens=True) for s in stops)

    def _vision_pass(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles [t, S, S, 3] on the device -> LM embeddings [t, tokens_per_tile, C]."""
        return self.model.vision(normalize_uint8(tiles, self.dtype))

    def close(self) -> None:
        """Give the device memory back, all of it: a second engine in this process (bench's timed run after its
        warm-up, the pipeline API's next model) needs it. On the H200 the 76B shape's second load ran out of
        memory with the first's 84 GB still held. Dropping the references is not enough: each compiled block
        holds its own forward (a reference cycle, freed only by the cycle collector), and torch.compile keeps
        what it compiled on the code objects of the blocks' methods, which outlive the model."""
        self.runner.close()
        self.vision.close()
        self.runner = None  # the runner holds the language model too
        del self.model
        if self.compiled or self.device.type == "cuda":  # device memory: a full collection (a few tenths of a
            gc.collect()                                  # second) is worth it there, not for the CPU's RAM
        if self.compiled:
            torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
