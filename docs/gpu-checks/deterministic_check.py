"""GPU check of the deterministic mode's kernels (issue 21): each against a torch reference at real shapes, and
bit-identical rows in batches of 1, 3, 8 and 128 (and in the decode-attention merge, whatever the span). Then a
timing of bi_matmul against cuBLAS at the 1B and 8B shapes' layer sizes. Usage: python3 deterministic_check.py
"""
import time

import torch
from batchvl.kernels.bi_matmul import bi_matmul_reference

from batchvl.kernels import bi_layernorm, bi_matmul, bi_rmsnorm, decode_attention

dev = torch.device("cuda")
torch.manual_seed(0)


def rows_invariant(fn, x: torch.Tensor) -> bool:
    """fn's rows computed in batches of 1, 3, 8 and all, at several places, are bit-identical."""
    whole = fn(x)
    for size in (1, 3, 8):
        for start in (0, 5, x.shape[0] - size):
            if not torch.equal(fn(x[start : start + size]), whole[start : start + size]):
                return False
    padded = fn(torch.cat([x[:1].expand(70, -1) * 0.5, x]))[70:]  # the rows behind 70 others
    return torch.equal(padded, whole)


for dtype in (torch.bfloat16, torch.float32):
    for k, n in ((896, 4864), (3584, 18944), (4096, 12288), (1024, 3072)):
        x = torch.randn(128, k, device=dev, dtype=dtype)
        w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
        b = torch.randn(n, device=dev, dtype=dtype)
        err = (bi_matmul(x, w, b).float() - bi_matmul_reference(x, w, b).float()).abs().max().item()
        print(f"bi_matmul {dtype} K={k} N={n}: max |err| {err:.3e}; rows invariant "
              f"{rows_invariant(lambda t, w=w, b=b: bi_matmul(t, w, b), x)}", flush=True)
    for k in (896, 1024, 3584, 4096, 7168):
        x = torch.randn(128, k, device=dev, dtype=dtype)
        w, b = torch.randn(k, device=dev, dtype=dtype), torch.randn(k, device=dev, dtype=dtype)
        ref = torch.nn.functional.layer_norm(x.float(), (k,), w.float(), b.float(), 1e-6)
        err = (bi_layernorm(x, w, b, 1e-6).float() - ref).abs().max().item()
        print(f"bi_layernorm {dtype} K={k}: max |err| {err:.3e}; rows invariant "
              f"{rows_invariant(lambda t, w=w, b=b: bi_layernorm(t, w, b, 1e-6), x)}; bi_rmsnorm rows invariant "
              f"{rows_invariant(lambda t, w=w: bi_rmsnorm(t, w, 1e-6), x)}", flush=True)

q = torch.randn(8, 14, 64, device=dev, dtype=torch.bfloat16)
k = torch.randn(8, 2, 4096, 64, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
lengths = torch.tensor([1, 100, 513, 1024, 2000, 2048, 3000, 4096], device=dev)
short = decode_attention(q, k[:, :, :2048].contiguous(), v[:, :, :2048].contiguous(), lengths.clamp(max=2048),
                         ordered=True)
long = decode_attention(q, k, v, lengths.clamp(max=2048), ordered=True)
tree = decode_attention(q, k, v, lengths.clamp(max=2048))
print(f"decode attention, ordered merge: span 2048 vs 4096 identical {torch.equal(short, long)}; tree merge "
      f"max |diff| {(tree.float() - long.float()).abs().max().item():.3e}", flush=True)

for m, k, n in ((128, 896, 4864), (8192, 896, 4864), (64, 3584, 18944), (8192, 3584, 18944)):
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    for name, fn in (("bi_matmul", lambda x=x, w=w: bi_matmul(x, w)), ("cuBLAS", lambda x=x, w=w: x @ w.T)):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        s = (time.perf_counter() - t) / 20
        print(f"{name} M={m} K={k} N={n}: {s * 1e3:.3f} ms, {2 * m * k * n / s / 1e12:.0f} TFLOP/s", flush=True)
