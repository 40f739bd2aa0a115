"""InternViT-300M's four products at the engine's vision chunk (64 tiles x 1,025 tokens = 65,600 rows), with
cuBLAS's heuristic choice and with PyTorch's TunableOp, which times every cuBLASLt algorithm for a shape and keeps
the fastest (issue 17, item 3; BENCHMARKS.md, session 9: in the pipeline fc2, K = 4,096, ran at 905 TFLOP/s and
the products with K = 1,024 at 589-614).

Prints each product's time and TFLOP/s both ways, and the largest difference between their outputs.
Usage: python3 vit_gemms.py [ROWS]   (default 65600; on the CPU a small case, TunableOp left off, as a check)
"""
import sys

import torch
import torch.nn.functional as F
from device_timing import seconds_per_call  # this folder's

from batchvl.tools.shapes import VIT_300M

HIDDEN, WIDE = VIT_300M["hidden_size"], VIT_300M["intermediate_size"]
# (K, N) of each product
PRODUCTS = {"qkv": (HIDDEN, 3 * HIDDEN), "proj": (HIDDEN, HIDDEN), "fc1": (HIDDEN, WIDE), "fc2": (WIDE, HIDDEN)}


def main():
    cuda = torch.cuda.is_available()
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else (65600 if cuda else 64)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    cases = {}
    for name, (k, n) in PRODUCTS.items():
        x = torch.randn(rows, k, device=device, dtype=dtype, generator=gen)
        w = torch.randn(n, k, device=device, dtype=dtype, generator=gen) * k ** -0.5
        b = torch.randn(n, device=device, dtype=dtype, generator=gen)
        cases[name] = (x, w, b, 2 * rows * k * n)
    print(f"[{rows} rows] on {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, {dtype}")
    heuristic = {}
    for name, (x, w, b, _) in cases.items():
        heuristic[name] = (seconds_per_call(lambda x=x, w=w, b=b: F.linear(x, w, b)), F.linear(x, w, b))
    tuned = {}
    if cuda:
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        torch.cuda.tunable.set_filename("/tmp/vit_gemms_tunableop.csv")
        for name, (x, w, b, _) in cases.items():
            tuned[name] = (seconds_per_call(lambda x=x, w=w, b=b: F.linear(x, w, b)), F.linear(x, w, b))
        torch.cuda.tunable.enable(False)
    print("| product | K x N | heuristic ms | TFLOP/s | TunableOp ms | TFLOP/s | max abs. difference |")
    print("|---|---|---|---|---|---|---|")
    for name, (x, w, _, flops) in cases.items():
        t0, y0 = heuristic[name]
        t1, y1 = tuned.get(name, (float("nan"), y0))
        print(f"| {name} | {x.shape[1]} x {w.shape[0]} | {t0 * 1e3:.3f} | {flops / t0 / 1e12:.0f} | {t1 * 1e3:.3f} | "
              f"{flops / t1 / 1e12:.0f} | {(y0.float() - y1.float()).abs().max().item():.1e} |")
    for result in torch.cuda.tunable.get_results() if cuda else ():
        print("TunableOp chose:", result)


if __name__ == "__main__":
    main()
