"""The transformers backend: transformers' own InternVL model and `generate`.

It is the correctness reference for the native engine and the baseline it is measured against, so it
does nothing clever: rows are left-padded into one batch, all their tiles go in one `pixel_values`, and
transformers places the image features at the `<IMG_CONTEXT>` positions in batch order.
"""

from __future__ import annotations

import logging

import torch

from batchvl.core import Request, Result
from batchvl.engine.base import Engine, GenerationParams, decode_result, pick_device, pick_dtype
from batchvl.engine.timing import StageTimes
from batchvl.media.normalize import normalize_uint8
from batchvl.models.checkpoint import LAYOUT_HF, CheckpointInfo

log = logging.getLogger(__name__)


class TransformersEngine(Engine):
    def __init__(self, checkpoint: CheckpointInfo, tokenizer, params: GenerationParams, device: str = "auto",
                 dtype: str = "auto", max_batch_size: int = 8, trust_remote_code: bool = False):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = tokenizer
        self.params = params
        self.max_batch_size = max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else params.eos_token_ids[0]
        self.remote = checkpoint.layout != LAYOUT_HF
        self.times = StageTimes()
        log.info("loading %s with transformers (%s, %s)", checkpoint.path, self.device, self.dtype)
        if self.remote:
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
        return [decode_result(r, row, p, self.tokenizer) for r, row in zip(requests, new.tolist(), strict=True)]

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
