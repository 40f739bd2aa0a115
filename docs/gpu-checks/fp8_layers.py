"""Issue 16 on the GPU: Fp8Linear's torch._scaled_mm against its float32 emulation (same quantized operands),
device memory held and peak while loading internvl2-1b in bf16 and in fp8, and the streamed fp8 load equal to
quantizing the bf16 model after loading. Run from the repository root with PYTHONPATH=."""

from pathlib import Path

import torch
from torch import nn

from batchvl.models.checkpoint import CheckpointInfo
from batchvl.models.fp8 import Fp8Linear, quantize_model
from batchvl.models.loader import load_model
from batchvl.tools.check_parity import build_checkpoint

dev, bf = torch.device("cuda"), torch.bfloat16


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


print("K N M: rel(_scaled_mm bf16 out, emulation) rel(_scaled_mm fp32 out, emulation)")
for k, n, bias in ((3584, 4608, True), (1024, 3072, False)):
    layer = Fp8Linear.from_linear(nn.Linear(k, n, bias=bias, device=dev, dtype=bf))
    for m in (1, 7, 64, 4097):
        x = torch.randn(m, k, device=dev, dtype=bf)
        bf_out = rel(layer(x), layer._emulated(x, bf))
        fp32_out = rel(layer._scaled_mm(x.float(), torch.float32), layer._emulated(x, torch.float32))
        print(k, n, m, f"{bf_out:.1e} {fp32_out:.1e}")
ck = CheckpointInfo.read(build_checkpoint("internvl2-1b", Path("/tmp/1b"), dev, bf))
after = None
for q in ("none", "fp8"):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_model(ck, dev, bf, q).model
    print(q, "held MiB", (torch.cuda.memory_allocated() - base) >> 20, "peak MiB",
          (torch.cuda.max_memory_allocated() - base) >> 20)
    if q == "none":
        quantize_model(model, vision=False)
        after = {name: p.clone() for name, p in model.named_parameters()}
    del model
streamed = load_model(ck, dev, bf, "fp8").model
print("streamed == quantized after loading:",
      all(torch.equal(after[n].view(torch.uint8), p.view(torch.uint8)) for n, p in streamed.named_parameters()))
