"""Vision-tower probe 2 (issue 17, item 3): the 300M tower as the engine now runs it (the patch embedding as a
matrix product, the embedding and blocks compiled, one CUDA graph a pass), with exact GELU and with
`engine.fused_vision_gelu`; tiles/s, and each one's error against the same weights in float32 with exact GELU.
Also: which GELU torch._addmm_activation's epilogue computes on this GPU, and the same for the 6B tower."""
import sys

import torch
import torch.nn.functional as F
from vision_probe import time_graph  # beside this script

from batchvl.engine.compile import compile_model
from batchvl.media.normalize import normalize_uint8
from batchvl.models.internvit import VisionEncoder, VisionSpec

dev = torch.device("cuda")
S300 = VisionSpec(hidden=1024, layers=24, heads=16, intermediate=4096, image_size=448, patch_size=14, llm_hidden=896)
S6B = VisionSpec(hidden=3200, layers=45, heads=25, intermediate=12800, image_size=448, patch_size=14, norm="rms",
                 qkv_bias=False, qk_norm=True, llm_hidden=6144)


class Holder(torch.nn.Module):  # compile_model's view of a model: .vision and .lm
    def __init__(self, enc):
        super().__init__()
        self.vision = enc
        self.lm = torch.nn.Module()
        self.lm.layers = []


def build(spec, dtype, seed=0):
    torch.manual_seed(seed)
    with torch.device("meta"):
        enc = VisionEncoder(spec)
    enc = enc.to_empty(device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device=dev))
            elif "ls" in name.split(".")[-1]:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, device=dev))
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=dev) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02))
    return enc.to(dtype).eval().requires_grad_(False)


def graphed(fn, tiles):
    t, out = time_graph(fn, tiles, reps=15, mode=torch.inference_mode)
    return t, out.float().clone()


def tower(spec, chunk, label):
    tiles = torch.randint(0, 256, (chunk, 448, 448, 3), dtype=torch.uint8, device=dev)
    with torch.inference_mode():
        ref = build(spec, torch.float32)(normalize_uint8(tiles, torch.float32)).float()
    torch.cuda.empty_cache()
    scale = ref.norm().item()
    for fused in (False, True):
        torch._dynamo.reset()
        enc = build(spec, torch.bfloat16)
        for b in enc.vit.blocks:
            b.fused_gelu = fused
        compile_model(Holder(enc))
        t, out = graphed(lambda x, e=enc: e(normalize_uint8(x, torch.bfloat16)), tiles)
        err = (out - ref).norm().item() / scale
        print(f"{label} chunk {chunk} fused_gelu={fused}: {chunk / t:7.1f} tiles/s; rel. error vs float32 exact "
              f"{err:.3e}, max |diff| {(out - ref).abs().max().item():.3e}", flush=True)
        del enc
        torch.cuda.empty_cache()


def epilogue():
    x = torch.randn(4096, 1024, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, 1024, device=dev, dtype=torch.bfloat16) / 32
    b = torch.randn(4096, device=dev, dtype=torch.bfloat16)
    lin = F.linear(x.float(), w.float(), b.float())
    got = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
    for a in ("none", "tanh"):
        print(f"_addmm_activation vs gelu(approximate={a}) in float32: max |diff| "
              f"{(got - F.gelu(lin, approximate=a)).abs().max().item():.3e}", flush=True)
    print(f"exact vs tanh GELU on these inputs: max |diff| "
          f"{(F.gelu(lin) - F.gelu(lin, approximate='tanh')).abs().max().item():.3e}", flush=True)


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    epilogue()
    tower(S300, 64, "300M")
    if "6b" in sys.argv[1:]:
        tower(S6B, 32, "6B")
