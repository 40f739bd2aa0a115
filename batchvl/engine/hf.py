"""The transformers backend: transformers' own InternVL model and `generate`.

It is the correctness reference for the native engine and the baseline it is measured against, so it
does nothing clever: rows are left-padded into one batch, all their tiles go in one `pixel_values`, and
transformers places the image features at the `<IMG_CONTEXT>` positions in batch order.

With `load_format='dummy'` (`bench --no-save`, for shapes whose weights do not fit the disk) no weight file is
read: the model is built from the checkpoint's config directly on the device, in the engine's dtype, and filled
by batchvl.models.dummy as the native engine's dummy weights are (same spread, norms near 1), so the two sides
do comparable arithmetic. Building on the device rather than on meta keeps the buffers the modules compute in
their constructors (the rotary inv_freq), which meta followed by `to_empty` would leave uninitialised; nothing
is built twice, so peak memory stays near the model's size.
"""

from __future__ import annotations

import gc
import logging

import torch

from batchvl.core import Request, Result
from batchvl.engine.base import Engine, GenerationParams, decode_result, pick_device, pick_dtype
from batchvl.engine.timing import StageTimes
from batchvl.errors import JobError
from batchvl.media.normalize import normalize_uint8
from batchvl.models.checkpoint import LAYOUT_HF, CheckpointInfo
from batchvl.models.dummy import fill_dummy

log = logging.getLogger(__name__)


class TransformersEngine(Engine):
    def __init__(self, checkpoint: CheckpointInfo, tokenizer, params: GenerationParams, device: str = "auto",
                 dtype: str = "auto", max_batch_size: int = 8, trust_remote_code: bool = False,
                 load_format: str = "auto"):
        check_load_format(checkpoint, load_format)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = tokenizer
        self.params = params
        self.max_batch_size = max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else params.eos_token_ids[0]
        self.remote = checkpoint.layout != LAYOUT_HF
        self.times = StageTimes()
        log.info("loading %s with transformers (%s, %s)%s", checkpoint.path, self.device, self.dtype,
                 ", random weights (load_format dummy)" if load_format == "dummy" else "")
        if load_format == "dummy":
            self.model = _dummy_model(checkpoint, self.device, self.dtype)
        elif self.remote:
            from transformers import AutoModel

            # OpenGVLab's own InternVLChatModel; its generate() takes pixel_values + input_ids and returns only
            # the new tokens.
            self.model = AutoModel.from_pretrained(checkpoint.path, dtype=self.dtype, trust_remote_code=True,
                                                   local_files_only=True)
            self.model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        else:
            from transformers import InternVLForConditionalGeneration

            self.model = InternVLForConditionalGeneration.from_pretrained(
                checkpoint.path, dtype=self.dtype, local_files_only=True)
        self.model.to(self.device).eval()
        # generate() falls back to the checkpoint's EOS ids when given none; ignore_eos must remove them.
        self.model.generation_config.eos_token_id = None

    @torch.inference_mode()
    def generate(self, requests: list[Request]) -> list[Result]:
        p = self.params
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row's last prompt token is at the same column
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        tiles = [r.tiles for r in requests if r.tiles is not None]
        pixel_values = normalize_uint8(torch.cat(tiles).to(self.device), self.dtype) if tiles else None  # [T,3,S,S]
        kwargs = dict(max_new_tokens=p.max_new_tokens, eos_token_id=list(p.stops) or None,
                      pad_token_id=self.pad_id, repetition_penalty=p.repetition_penalty,
                      min_new_tokens=p.min_new_tokens or None)
        if p.stop:
            kwargs.update(stop_strings=list(p.stop), tokenizer=self.tokenizer)
        if p.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            torch.manual_seed(p.seed)
            kwargs.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None)
        with self.times.stage("generate"):
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      pixel_values=pixel_values, **kwargs)
        new = out if self.remote else out[:, width:]  # [B, N]
        rows = new.tolist()
        if self.on_tokens is not None:  # transformers' streamers take one row: the tokens come at the end
            for r, row in zip(requests, rows, strict=True):
                self.on_tokens(r, row)
        return [decode_result(r, row, p, self.tokenizer) for r, row in zip(requests, rows, strict=True)]

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            gc.collect()  # what reference cycles hold goes too, before the next engine in this process loads
            torch.cuda.empty_cache()


def check_load_format(checkpoint: CheckpointInfo, load_format: str) -> None:
    """Dummy weights need a transformers-layout checkpoint: an OpenGVLab one's model is its own remote code,
    whose parameter names (its projector's LayerNorm is `mlp1.0`) fill_dummy cannot read. Raises JobError; the
    plan calls it too, so that `batchvl validate` says so before anything loads."""
    if load_format == "dummy" and checkpoint.layout != LAYOUT_HF:
        raise JobError(f"engine.load_format: dummy with the transformers backend needs a transformers-layout "
                       f"checkpoint (InternVLForConditionalGeneration); {checkpoint.path} is OpenGVLab's "
                       f"(InternVLChatModel): use engine.backend: native, which runs it on dummy weights")


def _dummy_model(checkpoint: CheckpointInfo, device: torch.device, dtype: torch.dtype):
    """transformers' InternVL from the checkpoint's config alone, built on `device` in `dtype` (see the module
    docstring) and filled with seeded random weights, with the checkpoint's generation config as from_pretrained
    would read it."""
    from transformers import AutoConfig, GenerationConfig, InternVLForConditionalGeneration

    config = AutoConfig.from_pretrained(checkpoint.path, local_files_only=True)
    with torch.device(device):  # every parameter and buffer is allocated here, once, in `dtype`
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    fill_dummy(model, dtype)
    if (checkpoint.path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint.path, local_files_only=True)
    return model
