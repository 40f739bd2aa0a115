"""`batchvl check-parity`: the native engine against transformers on the same random weights.

It builds a random-weight checkpoint of a named shape (transformers-native layout, written with
transformers itself), prepares a few image and text rows the way `batchvl run` does, and compares, row by
row, the native engine with transformers' `InternVLForConditionalGeneration` run on that row alone:

- the relative error ||a - b|| / ||b|| of the first generated step's logits, for native vs transformers in
  the chosen dtype, and for each against transformers in float32 (what bf16 noise alone amounts to);
- greedy agreement over the first N tokens (both sides forced to generate N tokens);
- with `--engine` settings under test (`quantization=fp8`, say), the same for the native engine without them,
  side by side: its error against float32 and how many leading tokens the two native runs agree on.

Random weights give nearly flat logits, so near-ties make greedy sequences in bf16 part ways sooner than a
trained model's would; the float32 row of the table shows what each side's own rounding costs.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from batchvl.config import EngineSpec, build_section, check_engine
from batchvl.core import Request
from batchvl.engine.base import GenerationParams, pick_device, pick_dtype
from batchvl.engine.factory import make_engine
from batchvl.media.normalize import normalize_uint8, tiles_to_uint8
from batchvl.media.tiling import tile_image
from batchvl.models.checkpoint import CheckpointInfo, checkpoint_chat_template, load_tokenizer
from batchvl.models.footprint import weight_bytes
from batchvl.models.loader import build_specs
from batchvl.prepare.prompt import PromptBuilder, place_images
from batchvl.tools.shapes import SHAPES as SHAPES_ALL
from batchvl.tools.tiny import build_tokenizer

SHAPES = {name: SHAPES_ALL[name] for name in ("tiny", "internvl2-1b", "internvl2-4b", "internvit-6b", "internvl3-8b",
                                              "internvl3_5-8b", "internvl-chat-v1-2")}
# Shapes whose checkpoints tile no image (InternVL 1: dynamic_image_size off): one tile per image, no thumbnail.
MAX_TILES = {"internvl-chat-v1-2": 1}


@dataclass
class RowCheck:
    id: str
    prompt_tokens: int
    rel_err_native_vs_ref: float  # native (dtype) vs transformers (dtype)
    rel_err_native_vs_fp32: float | None  # native (dtype) vs transformers (float32); None: no float32 side
    rel_err_ref_vs_fp32: float | None  # transformers (dtype) vs transformers (float32)
    agree_prefix: int  # leading tokens native and transformers (dtype) agree on
    agree_positions: int  # positions where they agree
    ref_fp32_agree_prefix: int | None  # the same for transformers (dtype) vs transformers (float32): the noise floor
    tokens: int
    # With engine settings (fp8, say): the native engine with none of them, on the same rows, side by side
    rel_err_default_vs_fp32: float | None = None  # native (dtype, default settings) vs transformers (float32)
    default_agree_prefix: int | None = None  # leading tokens native with the settings and without agree on


def _config(shape: str, shapes: dict | None = None):
    """The transformers-native InternVLConfig of a named shape, its GenerationConfig and the tokenizer."""
    from transformers import GenerationConfig, InternVLConfig

    vision, text = (shapes or SHAPES)[shape]
    tokenizer = build_tokenizer()
    config = InternVLConfig(vision_config=dict(vision), text_config=dict(text, eos_token_id=tokenizer.eos_token_id),
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            image_seq_length=(448 // vision["patch_size"]) ** 2 // 4, downsample_ratio=0.5,
                            tie_word_embeddings=False)
    generation = GenerationConfig(eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    return config, generation, tokenizer


def write_skeleton(shape: str, out: Path, shapes: dict | None = None) -> Path:
    """A checkpoint of the named shape without its weights: config.json, generation_config.json and the
    tokenizer only, written without building the model. The native engine runs it with
    `engine.load_format: dummy`; for shapes whose weights do not fit the disk (`bench --no-save`)."""
    config, generation, tokenizer = _config(shape, shapes)
    config.save_pretrained(out)
    generation.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_checkpoint(shape: str, out: Path, device: torch.device, dtype: torch.dtype, seed: int = 0,
                     shapes: dict | None = None) -> Path:
    """A random transformers-native checkpoint of the named shape, written with save_pretrained."""
    from transformers import InternVLForConditionalGeneration

    config, generation, tokenizer = _config(shape, shapes)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the dtype: a 40B shape built in float32 first would need 160 GB
    try:
        with torch.device(device):
            model = InternVLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # transformers initialises layer scales and embeddings to constants; vary them
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.generation_config = generation
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def sample_rows(tokenizer, template: str, tokens_per_tile: int, max_tiles: int = 12) -> list[Request]:
    """A 7-tile image row, a 2-image row, a small image row and a text-only row (with `max_tiles` 1: a
    caption-1tile row, each image resized onto one tile)."""
    from PIL import Image

    builder = PromptBuilder(tokenizer, template, tokens_per_tile)
    g = torch.Generator().manual_seed(0)

    def image(w, h):
        arr = (torch.rand(h // 8, w // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        return Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC)

    specs = [("caption-7tile" if max_tiles >= 12 else f"caption-{max_tiles}tile", "Describe this image in detail.",
              [image(1344, 896)]),
             ("two-images", "Image-1: <image>\nImage-2: <image>\nCompare.", [image(800, 600), image(448, 900)]),
             ("small", "What is this?", [image(320, 240)]),
             ("text-only", "Write a short poem about tiles.", [])]
    rows = []
    for rid, text, images in specs:
        tiles = [tile_image(im, 1, max_tiles) for im in images]
        counts = [len(t) for t in tiles]
        ids = builder.encode(place_images(text, len(images)), counts)
        pixels = torch.cat([tiles_to_uint8(t) for t in tiles]) if tiles else None
        rows.append(Request(id=rid, prompt_ids=ids, tiles=pixels, tiles_per_image=counts))
    return rows


@torch.inference_mode()
def reference(model, request: Request, tokens: int, device) -> tuple[torch.Tensor, list[int]]:
    ids = torch.tensor([request.prompt_ids], device=device)
    pixels = None if request.tiles is None else normalize_uint8(request.tiles.to(device), model.dtype)  # [T,3,S,S]
    logits = model(input_ids=ids, pixel_values=pixels).logits[0, -1].float().cpu()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                         max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return logits, out[0, ids.shape[1]:].tolist()


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_parity(shape: str, tokens: int = 16, device: str = "auto", dtype: str = "auto",
                 workdir: Path | None = None, engine: dict | None = None,
                 layers: int | None = None) -> tuple[list[RowCheck], dict]:
    """The native engine (with `engine`'s extra settings, e.g. compile) against transformers on the same
    random weights: first-step logits and greedy tokens, per sample row. `layers`: at most this many layers in
    the vision tower and in the language model, at the shape's own widths (a 40B shape's checkpoint, 80 GB in
    bf16, does not fit the H200 host's 64 GB disk)."""
    from transformers import InternVLForConditionalGeneration

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(tmp.name) if tmp else workdir
    info: dict = {"shape": shape, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                  "dtype": str(dt).removeprefix("torch."), "tokens": tokens, "torch": torch.__version__,
                  "engine": dict(engine or {})}
    shapes = None
    if layers is not None:
        vision, text = SHAPES[shape]
        shapes = {shape: (dict(vision, num_hidden_layers=min(layers, vision["num_hidden_layers"])),
                          dict(text, num_hidden_layers=min(layers, text["num_hidden_layers"])))}
        info["layers"] = {"vision": shapes[shape][0]["num_hidden_layers"],
                          "text": shapes[shape][1]["num_hidden_layers"]}
    t0 = time.perf_counter()
    path = build_checkpoint(shape, root / shape, dev, dt, shapes=shapes)
    info["build_s"] = round(time.perf_counter() - t0, 1)
    ck = CheckpointInfo.read(path)
    tokenizer = load_tokenizer(path)
    rows = sample_rows(tokenizer, checkpoint_chat_template(path, tokenizer), ck.tokens_per_tile,
                       MAX_TILES.get(shape, 12))

    params = GenerationParams(max_new_tokens=tokens, eos_token_ids=(tokenizer.eos_token_id,), ignore_eos=True)
    # The job file's engine section, checked as a job file's is, then built by the one engine factory.
    spec = dataclasses.replace(build_section(EngineSpec, dict(engine or {}), "engine"), backend="native",
                               device=dev.type, dtype=str(dt).removeprefix("torch."), max_batch_size=len(rows))
    check_engine(spec)
    native_logits, native_ids = _native(spec, ck, tokenizer, params, rows)
    default = None
    if engine:  # the same engine without the settings under test, for the columns beside them
        plain = dataclasses.replace(build_section(EngineSpec, {}, "engine"), backend="native", device=spec.device,
                                    dtype=spec.dtype, max_batch_size=spec.max_batch_size)
        default = _native(plain, ck, tokenizer, params, rows)

    refs = {}
    fp32 = _fp32_fits(ck, dev)
    if not fp32:
        info["fp32"] = "not run: the weights in float32 do not fit the device"
    for ref_dtype in (dt, torch.float32) if fp32 else (dt,):
        model = InternVLForConditionalGeneration.from_pretrained(path, dtype=ref_dtype).to(dev).eval()
        refs[ref_dtype] = [reference(model, r, tokens, dev) for r in rows]
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    checks = []
    for i, r in enumerate(rows):
        ref_logits, ref_ids = refs[dt][i]
        fp32_logits, fp32_ids = refs[torch.float32][i] if fp32 else (None, None)
        mine = native_ids[i]
        prefix = _common_prefix(mine, ref_ids)
        checks.append(RowCheck(
            id=r.id, prompt_tokens=len(r.prompt_ids),
            rel_err_native_vs_ref=rel_err(native_logits[i], ref_logits),
            rel_err_native_vs_fp32=rel_err(native_logits[i], fp32_logits) if fp32 else None,
            rel_err_ref_vs_fp32=rel_err(ref_logits, fp32_logits) if fp32 else None,
            agree_prefix=prefix, agree_positions=sum(a == b for a, b in zip(mine, ref_ids, strict=True)),
            ref_fp32_agree_prefix=_common_prefix(ref_ids, fp32_ids) if fp32 else None, tokens=tokens))
        if default is not None and fp32:
            checks[-1].rel_err_default_vs_fp32 = rel_err(default[0][i], fp32_logits)
            checks[-1].default_agree_prefix = _common_prefix(mine, default[1][i])
    if tmp:
        tmp.cleanup()
    return checks, info


def _fp32_fits(ck: CheckpointInfo, device: torch.device) -> bool:
    """Whether transformers can hold the checkpoint's weights in float32 on `device` (footprint.weight_bytes), with
    a tenth of the device's memory to spare for activations. A 40B shape in float32 (160 GB) fits no one GPU: its
    check compares the native engine with transformers in the check's dtype only."""
    if device.type != "cuda":
        return True
    fp32_bytes = weight_bytes(*build_specs(ck)[:2], itemsize=4)["total"]
    return fp32_bytes < 0.9 * torch.cuda.get_device_properties(device).total_memory


def _native(spec: EngineSpec, ck: CheckpointInfo, tokenizer, params: GenerationParams,
            rows: list[Request]) -> tuple[torch.Tensor, list[list[int]]]:
    """The native engine's first-step logits [rows, V] and greedy tokens for `rows`, built by the engine factory."""
    engine = make_engine(spec, ck, tokenizer, params)
    engine.first_step_logits = []
    engine.generate(rows)
    logits, ids = torch.cat(engine.first_step_logits), engine.last_tokens
    engine.close()
    return logits, ids


def format_table(checks: list[RowCheck], info: dict) -> str:
    depth = f" (layers: vision {info['layers']['vision']}, text {info['layers']['text']})" if "layers" in info else ""
    head = (f"shape {info['shape']}{depth} on {info['device']}, {info['dtype']}, torch {info['torch']}, "
            f"engine settings {info.get('engine') or 'default'}; "
            f"first-step logits relative error and greedy agreement over {info['tokens']} tokens")
    beside = any(c.rel_err_default_vs_fp32 is not None for c in checks)
    extra = " native (default settings) vs fp32 | agree with default native (prefix) |" if beside else ""
    lines = [head, "| row | prompt tokens | native vs transformers | native vs fp32 | transformers vs fp32 "
             "| agree (prefix) | agree (positions) | transformers vs fp32 agree (prefix) |" + extra,
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if beside else "")]
    def err(value: float | None) -> str:
        return "-" if value is None else f"{value:.2e}"

    for c in checks:
        cells = (f" {c.rel_err_default_vs_fp32:.2e} | {c.default_agree_prefix}/{c.tokens} |" if beside else "")
        noise = "-" if c.ref_fp32_agree_prefix is None else f"{c.ref_fp32_agree_prefix}/{c.tokens}"
        lines.append(f"| {c.id} | {c.prompt_tokens} | {c.rel_err_native_vs_ref:.2e} | {err(c.rel_err_native_vs_fp32)} "
                     f"| {err(c.rel_err_ref_vs_fp32)} | {c.agree_prefix}/{c.tokens} | {c.agree_positions}/{c.tokens} "
                     f"| {noise} |" + cells)
    if "fp32" in info:
        lines.append(f"float32 columns: {info['fp32']}")
    return "\n".join(lines)


def main(shapes: list[str], tokens: int, device: str, dtype: str, out: Path | None,
         engine: dict | None = None, layers: int | None = None) -> int:
    report = []
    for shape in shapes:
        checks, info = check_parity(shape, tokens, device, dtype, engine=engine, layers=layers)
        print(format_table(checks, info), flush=True)
        report.append({"info": info, "rows": [c.__dict__ for c in checks]})
    if out:
        out.write_text(json.dumps(report, indent=2))
    return 0
