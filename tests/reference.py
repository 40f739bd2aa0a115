"""The reference a batchvl run is checked against: transformers' own InternVL `generate`, fed by hand.

The prompt is built here from the published recipe, not with batchvl's prompt builder, and the tiles come
from the restated tiling in test_tiling, so a mistake in either shows up as a mismatch.

transformers' InternVL always swaps the pixel shuffle's axes back (OpenGVLab's `ps_version: v2`); InternVL 1
checkpoints (`v1`) leave them transposed. For those the reference model's `pixel_shuffle` is replaced by the
published v1 algorithm, restated in test_models (from OpenGVLab's InternVLChatModel.pixel_shuffle); the rest of
the model is transformers' own.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .test_models import reference_pixel_shuffle
from .test_tiling import reference_normalize, reference_tiles


@lru_cache(maxsize=16)
def load_reference(model_dir: Path, ps_version: str = "v2"):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    if ps_version != "v2":  # [T, W, H, C] -> [T, W/2, H/2, 4C] in InternVL 1's order
        model.model.pixel_shuffle = lambda x, scale_factor=0.5: reference_pixel_shuffle(x, scale_factor, ps_version)
    return tokenizer, model


def reference_prompt(tokenizer, text: str, tiles_per_image: list[int], tokens_per_tile: int = 16,
                     template: str | None = None) -> str:
    """`template`: the InternVL conversation template name for checkpoints without a chat template."""
    if tiles_per_image and "<image>" not in text:
        text = "<image>\n" * len(tiles_per_image) + text
    messages = [{"role": "user", "content": text}]
    if template is not None:
        from batchvl.prepare.templates import get_template

        rendered = get_template(template).render(messages)
    else:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for tiles in tiles_per_image:
        rendered = rendered.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (tokens_per_tile * tiles) + "</img>", 1)
    return rendered


def reference_pixels(image_bytes: list[bytes], max_num: int = 12) -> tuple[torch.Tensor | None, list[int]]:
    tiles, counts = [], []
    for data in image_bytes:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        row_tiles = reference_tiles(image, 1, max_num)
        counts.append(len(row_tiles))
        tiles += [reference_normalize(t) for t in row_tiles]
    return (torch.stack(tiles) if tiles else None), counts


@torch.inference_mode()
def reference_generate(model_dir: Path, text: str, image_bytes: list[bytes], max_new_tokens: int,
                       max_num: int = 12, template: str | None = None,
                       stop_tokens: tuple[str, ...] = (), ps_version: str = "v2") -> tuple[str, int, int]:
    """Greedy text, prompt length and output length, for one row run alone with transformers."""
    tokenizer, model = load_reference(model_dir, ps_version)
    pixels, counts = reference_pixels(image_bytes, max_num)
    prompt = reference_prompt(tokenizer, text, counts, template=template)
    inputs = tokenizer(prompt, return_tensors="pt")
    eos = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens]
    out = model.generate(**inputs, pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    for i, t in enumerate(new):
        if t in eos:
            new = new[: i + 1]
            break
    return tokenizer.decode(new, skip_special_tokens=True), inputs["input_ids"].shape[1], len(new)
