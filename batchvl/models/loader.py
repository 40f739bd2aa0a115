"""Building an InternVL model from a checkpoint of either layout, streaming its weights onto the device.

The model is created on the meta device and materialised directly on the target device in the job's
dtype; then each safetensors shard is opened in turn and each tensor is copied into its place (renamed,
regrouped or written into a slice of a fused weight) and released, so the host never holds a second copy
of the model. Every parameter must be written exactly once; anything missing or unexpected is an error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from batchvl.config.spec import shown
from batchvl.errors import CheckpointError
from batchvl.models.checkpoint import LAYOUT_HF, LAYOUT_OPENGVLAB, CheckpointInfo, read_json
from batchvl.models.compressed import SCALE_SUFFIX, ZERO_POINT_SUFFIX, dense_refused
from batchvl.models.decoder import DecoderLM, DecoderSpec
from batchvl.models.dummy import fill_dummy
from batchvl.models.families import FAMILIES, text_family
from batchvl.models.fp8 import FP8_DTYPE, fp8_targets, quantize_weight, to_fp8_modules
from batchvl.models.internvit import VisionEncoder, VisionSpec

log = logging.getLogger(__name__)


def vision_spec(ck: CheckpointInfo, llm_hidden: int) -> VisionSpec:
    v = ck.vision_config
    hf = ck.layout == LAYOUT_HF
    image_size = ck.tile_size
    own_size = int(v.get("image_size", [image_size])[0] if isinstance(v.get("image_size"), list)
                   else v.get("image_size", image_size))
    if own_size != image_size:
        raise CheckpointError(f"force_image_size {image_size} differs from the vision tower's {own_size}: "
                              "position-embedding interpolation is not supported")
    return VisionSpec(
        hidden=int(v["hidden_size"]),
        layers=int(v["num_hidden_layers"]),
        heads=int(v["num_attention_heads"]),
        intermediate=int(v["intermediate_size"]),
        image_size=image_size,
        patch_size=ck.patch_size,
        norm="rms" if v.get("norm_type", "layer_norm") == "rms_norm" else "layer",
        eps=float(v.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(v.get("attention_bias", True) if hf else v.get("qkv_bias", True)),
        qk_norm=bool(v.get("use_qk_norm", False) if hf else v.get("qk_normalization", False)),
        select_layer=int(ck.config.get("vision_feature_layer", -1) if hf else ck.config.get("select_layer", -1)),
        downsample_ratio=ck.downsample_ratio,
        ps_version="v2" if hf else str(ck.config.get("ps_version", "v1")),
        llm_hidden=llm_hidden,
    )


class InternVL(nn.Module):
    """The vision encoder and the language model, side by side; the engine drives them."""

    def __init__(self, vision: VisionSpec, text: DecoderSpec):
        super().__init__()
        self.vision = VisionEncoder(vision)
        self.lm = DecoderLM(text)


@dataclass
class LoadedModel:
    model: InternVL
    vision: VisionSpec
    text: DecoderSpec
    family: str


def build_specs(ck: CheckpointInfo) -> tuple[VisionSpec, DecoderSpec, str]:
    """The vision and language specs of a checkpoint and its family name. Raises CheckpointError (`model: ...`)
    for a family, or a feature of one (sliding-window attention, a rope type), that batchvl does not run."""
    family = text_family(ck)
    try:
        text = FAMILIES[family].spec_from_config(ck.text_config)
    except CheckpointError:
        raise
    except (ValueError, NotImplementedError) as e:  # a family's refusal of a config feature
        raise CheckpointError(f"{family} language model: {e}") from None
    return vision_spec(ck, text.hidden), text, family


def load_model(ck: CheckpointInfo, device: torch.device, dtype: torch.dtype, quantization: str = "none",
               quantize_vision: bool = False, load_format: str = "auto") -> LoadedModel:
    """The checkpoint's model on `device` in `dtype`. With `quantization='fp8'`, the language model's linear
    layers (and the vision tower's, with `quantize_vision`) are Fp8Linear modules from the start, filled as the
    weights stream in: a dense tensor is quantized on the device, slice by slice, and an fp8 checkpoint's
    tensors are copied as they are; no dense copy of those layers is ever held. An fp8 checkpoint needs
    quantization 'fp8' (JobError otherwise: batchvl does not dequantize it). With `load_format='dummy'` no weight
    file is read: every parameter is filled with seeded random values on the device (batchvl.models.dummy), fp8
    layers directly in fp8."""
    vision, text, family = build_specs(ck)
    fp8_checkpoint = ck.quantization is not None
    if fp8_checkpoint and quantization != "fp8":
        raise dense_refused(ck.path)
    with torch.device("meta"), _SkipInit():
        model = InternVL(vision, text)
    model = model.to(dtype)  # dtype first: on meta it costs nothing; fp8 layers are swapped in after it
    if quantization == "fp8":
        swapped = set(to_fp8_modules(model, fp8_targets(model, quantize_vision)))
        if fp8_checkpoint and load_format != "dummy":  # and whatever else the checkpoint holds in fp8 (vision, say)
            try:
                to_fp8_modules(model, _fp8_modules(ck, vision, text, FAMILIES[family]) - swapped,
                               keep_misfits=False)
            except (TypeError, AttributeError) as e:
                raise CheckpointError(f"{ck.path} stores in fp8 a layer batchvl keeps dense: {e}") from None
    _to_empty(model, device)
    if load_format == "dummy":
        fill_dummy(model, dtype)
    else:
        _load_weights(model, ck, vision, text, FAMILIES[family], device, dtype)
    model.lm.tie_weights()
    model.eval().requires_grad_(False)
    return LoadedModel(model, vision, text, family)


class _SkipInit(TorchFunctionMode):
    """Modules built on the meta device without their initialisers (torch.nn.init's functions return their tensor
    untouched): a meta tensor has no values to fill, and nn.Embedding's normal_ on the meta device goes through
    torch._refs, which imports torch._dynamo: 1.2 s of CPU in every process that loads a model. A mode, so only
    this thread's module building is affected."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def _to_empty(model: nn.Module, device: torch.device) -> None:
    """Module.to_empty without torch.empty_like: on meta tensors that imports sympy (0.7 s of CPU in every process
    that loads a model). Each parameter and buffer becomes an uninitialised tensor of its shape and dtype on
    `device`; a tensor shared by several modules stays shared."""
    made: dict[int, torch.Tensor] = {}

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            new = torch.empty(t.shape, dtype=t.dtype, device=device)
            made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return made[id(t)]

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    table[name] = empty(t)


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, or the one model.safetensors."""
    return _weights_index(path)[0]


def _weights_index(path: Path) -> tuple[list[Path], dict[str, Path]]:
    """The safetensors files of a checkpoint, and which file holds each tensor as its index says ({} for a
    single model.safetensors, which has no index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map is not a mapping of tensor names to file names")
        where = {name: path / file for name, file in weight_map.items()}
        return sorted(set(where.values())), where
    single = path / "model.safetensors"
    if single.is_file():
        return [single], {}
    raise CheckpointError(f"no safetensors weights in {path} (model.safetensors or its index)")


def check_weights(path: Path, required: bool = True) -> None:
    """Open the header of every safetensors file of a checkpoint (safetensors reads only the header, and checks
    that the file is as long as it says), and check that each tensor the index names is in its file: a
    missing, truncated or garbage shard is a CheckpointError (`model: ...`) here, before any work.
    `required`: whether a checkpoint without safetensors weights is an error (the transformers backend can
    also load other formats)."""
    from safetensors import safe_open

    if not required and not ((path / "model.safetensors.index.json").is_file()
                             or (path / "model.safetensors").is_file()):
        return
    files, where = _weights_index(path)
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"the weights file {shown(file.name, quote=False)} that the index names is "
                                  f"missing from {path}")
        try:
            with safe_open(str(file), framework="pt") as f:
                present = set(f.keys())
        except Exception as e:  # safetensors' SafetensorError, an OSError: the file is not a safetensors file
            raise CheckpointError(f"{file} is not a readable safetensors file ({_reason(e)})") from None
        missing = [name for name, held_in in where.items() if held_in == file and name not in present]
        if missing:
            raise CheckpointError(f"{file.name} lacks {len(missing)} tensor(s) that the index puts there, e.g. "
                                  f"{shown(missing[0])}")


def _reason(e: BaseException) -> str:
    return shown(str(e), quote=False) if str(e) else type(e).__name__


def _load_weights(model: InternVL, ck: CheckpointInfo, vs: VisionSpec, ts: DecoderSpec, family: ModuleType,
                  device: torch.device, dtype: torch.dtype) -> None:
    from safetensors import safe_open

    params = dict(model.named_parameters())
    filled: dict[str, int] = {name: 0 for name in params}
    vit_layers = vs.layers_to_run
    load_device = str(device) if device.type == "cuda" else "cpu"
    for file in shard_files(ck.path):
        try:
            opened = safe_open(str(file), framework="pt", device=load_device)
        except Exception as e:  # a shard that changed or broke since the plan checked it
            raise CheckpointError(f"{file} is not a readable safetensors file ({_reason(e)})") from None
        with opened as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                if name.endswith(ZERO_POINT_SUFFIX) and ck.quantization is not None:
                    _check_zero_point(name, f.get_tensor(name))
                    continue
                for target, offset, tensor in _route(name, ck.layout, vs, ts, family, vit_layers, f):
                    for dest_name, rows in _place(params, target, offset, tensor, name, device, dtype):
                        filled[dest_name] += rows
                        if filled[dest_name] > params[dest_name].numel():
                            raise CheckpointError(f"weight {name}: {dest_name} is written more than once")
    if ts.tie_embeddings and filled.get("lm.lm_head.weight", 0) == 0:
        filled["lm.lm_head.weight"] = params["lm.lm_head.weight"].numel()  # tied to the embeddings below
    missing = [n for n, p in params.items() if filled[n] != p.numel()]
    if missing:
        raise CheckpointError(f"{len(missing)} parameter(s) not (fully) loaded, e.g. {missing[:5]}")


def _place(params: dict[str, nn.Parameter], target: str, offset: int, tensor: torch.Tensor, name: str,
           device: torch.device, dtype: torch.dtype) -> list[tuple[str, int]]:
    """Copy one routed checkpoint tensor into rows offset.. of `target`; returns [(parameter, elements written)].
    An Fp8Linear's weight takes fp8 rows as they are, or dense rows quantized here into it and its scale."""
    param = params.get(target)
    if param is None:
        raise CheckpointError(f"weight {name} maps to {target}, which the model does not have")
    rows = tensor.shape[0] if param.dim() > 0 else 1
    dest = param.data if param.dim() == 0 else param.data.narrow(0, offset, rows)
    if dest.shape != tensor.shape:
        raise CheckpointError(f"weight {name}: shape {tuple(tensor.shape)} does not fit {target} "
                              f"rows {offset}..{offset + rows} of {tuple(param.shape)}")
    if tensor.dtype.itemsize == 1 and tensor.is_floating_point() and param.dtype != FP8_DTYPE:
        raise CheckpointError(f"weight {name} is {tensor.dtype} but has no {SCALE_SUFFIX.lstrip('.')} beside it "
                              "(an fp8 weight needs one scale per output channel)")
    if param.dtype != FP8_DTYPE:  # a dense parameter (in the model's dtype), or an fp8 layer's float32 scale
        dest.copy_(tensor.to(device=device, dtype=param.dtype))
        return [(target, tensor.numel())]
    if tensor.dtype == FP8_DTYPE:
        dest.copy_(tensor.to(device))
        return [(target, tensor.numel())]
    if tensor.dtype.itemsize == 1:
        raise CheckpointError(f"weight {name} is {tensor.dtype}; fp8 weights must be float8_e4m3fn")
    q, scale = quantize_weight(tensor.to(device=device, dtype=dtype))  # as the model's dtype would hold it
    dest.copy_(q)
    scale_name = target.removesuffix(".weight") + SCALE_SUFFIX
    params[scale_name].data.narrow(0, offset, rows).copy_(scale)
    return [(target, tensor.numel()), (scale_name, rows)]


def _check_zero_point(name: str, zero_point: torch.Tensor) -> None:
    """compressed-tensors omits zero points of symmetric schemes; one that is there must be zero."""
    if bool(zero_point.ne(0).any()):
        raise CheckpointError(f"weight {name} is a non-zero zero point: an asymmetric scheme, which FP8_DYNAMIC "
                              "is not")


class _Shapes:
    """A safetensors file seen through its header only: get_tensor gives an empty meta tensor of the shape."""

    def __init__(self, f: Any):
        self.f = f

    def get_tensor(self, name: str) -> torch.Tensor:
        return torch.empty(self.f.get_slice(name).get_shape(), device="meta")


def _fp8_modules(ck: CheckpointInfo, vs: VisionSpec, ts: DecoderSpec, family: ModuleType) -> set[str]:
    """Our modules that an fp8 checkpoint holds in fp8: those a `<module>.weight_scale` routes to, read from the
    files' headers. A module that `ignore` lists cannot have one (CheckpointError)."""
    from safetensors import safe_open

    fp8 = ck.quantization
    out = set()
    for file in shard_files(ck.path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                if not name.endswith(SCALE_SUFFIX):
                    continue
                module = name.removesuffix(SCALE_SUFFIX)
                if fp8.ignores(module):
                    raise CheckpointError(f"weight {name}: quantization_config.ignore lists {module}, yet it has "
                                          "an fp8 scale")
                try:
                    routed = _route(name, ck.layout, vs, ts, family, vs.layers_to_run, _Shapes(f))
                except KeyError:  # a family's map_weight: no layer of ours has fp8 weights for this name
                    raise CheckpointError(f"weight {name}: {module} is stored in fp8, which batchvl loads only "
                                          "for linear layers of the decoder and the vision tower") from None
                out.update(target.removesuffix(SCALE_SUFFIX) for target, _, _ in routed)
    return out


@dataclass(frozen=True)
class _VitNames:
    """How one layout spells the vision tower's weights."""

    top: dict[str, str]  # embedding parameters -> ours
    layer: re.Pattern  # "<layers>.<i>.<rest>"
    modules: dict[str, str]  # per-layer module (or bare parameter) -> ours
    qkv_parts: tuple[str, ...] = ()  # separate q, k, v modules to stack into our fused qkv


_VIT_NAMES = {
    LAYOUT_HF: _VitNames(
        top={"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.bias"},
        layer=re.compile(r"^encoder\.layer\.(\d+)\.(.+)$"),
        modules={"attention.projection_layer": "proj", "attention.q_norm": "q_norm", "attention.k_norm": "k_norm",
                 "layernorm_before": "norm1", "layernorm_after": "norm2", "mlp.fc1": "fc1", "mlp.fc2": "fc2",
                 "lambda_1": "ls1", "lambda_2": "ls2"},
        qkv_parts=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ),
    LAYOUT_OPENGVLAB: _VitNames(
        top={"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
             "embeddings.patch_embedding.weight": "patch_embed.weight",
             "embeddings.patch_embedding.bias": "patch_embed.bias"},
        layer=re.compile(r"^encoder\.layers\.(\d+)\.(.+)$"),
        modules={"attn.qkv": "qkv", "attn.proj": "proj", "attn.q_norm": "q_norm", "attn.k_norm": "k_norm",
                 "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "fc1", "mlp.fc2": "fc2", "ls1": "ls1", "ls2": "ls2"},
    ),
}


def _route(name: str, layout: str, vs: VisionSpec, ts: DecoderSpec, family: ModuleType, vit_layers: int,
           f: Any) -> list[tuple[str, int, torch.Tensor]]:
    """A checkpoint tensor name -> [(our parameter, row offset, tensor)]; [] for tensors we do not use."""
    if layout == LAYOUT_HF:
        name = name.removeprefix("model.")
        if name.startswith("language_model.") or name == "lm_head.weight":
            lm_name = name.removeprefix("language_model.").removeprefix("model.")
            return [("lm." + t, o, x) for t, o, x in family.map_weight(lm_name, f.get_tensor(name), ts)]
        if name.startswith("vision_tower."):
            return _route_vit(name.removeprefix("vision_tower."), _VIT_NAMES[layout], vs, vit_layers, f, name)
        if name.startswith("multi_modal_projector."):
            part = {"layer_norm": "norm", "linear_1": "fc1", "linear_2": "fc2"}
            mod, _, kind = name.removeprefix("multi_modal_projector.").rpartition(".")
            return [(f"vision.projector.{part[mod]}.{kind}", 0, f.get_tensor(name))]
    else:
        if name.startswith("language_model."):
            lm_name = name.removeprefix("language_model.").removeprefix("model.")
            return [("lm." + t, o, x) for t, o, x in family.map_weight(lm_name, f.get_tensor(name), ts)]
        if name.startswith("vision_model."):
            return _route_vit(name.removeprefix("vision_model."), _VIT_NAMES[layout], vs, vit_layers, f, name)
        if name.startswith("mlp1."):
            index, _, kind = name.removeprefix("mlp1.").partition(".")
            part = {"0": "norm", "1": "fc1", "3": "fc2"}[index]
            return [(f"vision.projector.{part}.{kind}", 0, f.get_tensor(name))]
    raise CheckpointError(f"unexpected weight {name!r} in a {layout}-layout checkpoint")


def _route_vit(name: str, names: _VitNames, vs: VisionSpec, vit_layers: int, f: Any, full: str):
    if name in names.top:
        return [(f"vision.vit.{names.top[name]}", 0, f.get_tensor(full))]
    m = names.layer.match(name)
    if not m:
        raise CheckpointError(f"unexpected vision weight {full!r}")
    i, rest = int(m.group(1)), m.group(2)
    if i >= vit_layers:  # past the selected layer: never run, so never loaded
        return []
    prefix = f"vision.vit.blocks.{i}."
    if rest in names.modules:  # a bare parameter (layer scale)
        return [(prefix + names.modules[rest], 0, f.get_tensor(full))]
    mod, _, kind = rest.rpartition(".")
    if mod in names.qkv_parts:
        return [(prefix + "qkv." + kind, names.qkv_parts.index(mod) * vs.hidden, f.get_tensor(full))]
    if mod not in names.modules:
        raise CheckpointError(f"unexpected vision weight {full!r}")
    return [(prefix + names.modules[mod] + "." + kind, 0, f.get_tensor(full))]
