"""Vision-tower probe (issue 17, item 3): InternViT-300M (+ projector) of the internvl2-1b shape, random bf16
weights on the GPU, tiles/s of one pass over a chunk of tiles, replayed as a CUDA graph as the engine does.

Variants: eager; each block compiled (dynamic shapes, the engine's default); each block compiled for the static
chunk shape; the whole encoder compiled; each SDPA backend forced (eager blocks); fp8 linears. Then the
pieces alone (attention per backend, the four matrix products) against their FLOP counts, and a kernel
profile of one compiled pass without the graph. Usage: python3 vision_probe.py [chunk ...]
"""
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from batchvl.media.normalize import normalize_uint8
from batchvl.models.internvit import VisionEncoder, VisionSpec

torch.backends.cuda.matmul.allow_tf32 = True
dev = torch.device("cuda")
SPEC = VisionSpec(hidden=1024, layers=24, heads=16, intermediate=4096, image_size=448, patch_size=14,
                  llm_hidden=896)
N = 1025
FLOP_TILE = 24 * (2 * N * (1024 * 3072 + 1024 * 1024 + 2 * 1024 * 4096) + 4 * N * N * 1024)
CHUNKS = [int(a) for a in sys.argv[1:]] or [64]


def build():
    torch.manual_seed(0)
    enc = VisionEncoder(SPEC)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.02)
    return enc.to(dev, torch.bfloat16).eval().requires_grad_(False)


def time_graph(fn, tiles, reps=20, mode=torch.no_grad):
    """Median seconds of one graph replay of fn(tiles) and the graph's output, after a warm-up on a side stream;
    `mode`: the autograd context of the warm-up and the capture (vision_probe2 ran under inference_mode)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), mode():
        for _ in range(2):
            fn(tiles)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), mode():
        out = fn(tiles)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times), out


def report(label, seconds, tiles, ref=None, out=None):
    err = ""
    if ref is not None and out is not None:
        err = f"  max|diff| vs eager {(out.float() - ref.float()).abs().max().item():.3e}"
    print(f"{label:<44} {tiles / seconds:8.1f} tiles/s  {FLOP_TILE * tiles / seconds / 1e12:6.1f} TFLOP/s{err}",
          flush=True)


def main():
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    enc = build()
    run = lambda t: enc(normalize_uint8(t, torch.bfloat16))  # noqa: E731
    for chunk in CHUNKS:
        tiles = torch.randint(0, 256, (chunk, 448, 448, 3), dtype=torch.uint8, device=dev)
        print(f"--- {chunk} tiles a pass", flush=True)
        t, ref = time_graph(run, tiles)
        ref = ref.clone()
        report("eager, graph", t, chunk)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    t, out = time_graph(run, tiles)
                report(f"eager, graph, {backend.name}", t, chunk, ref, out)
            except Exception as e:  # noqa: BLE001 - a probe: report and go on
                print(f"eager {backend.name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        for label, kwargs in (("blocks compiled dynamic (default)", dict(dynamic=True)),
                              ("blocks compiled static", dict(dynamic=False))):
            torch._dynamo.reset()
            e2 = build()
            for b in e2.vit.blocks:
                b.forward = torch.compile(b.forward, **kwargs)
            t0 = time.perf_counter()
            t, out = time_graph(lambda x, e=e2: e(normalize_uint8(x, torch.bfloat16)), tiles)
            report(f"{label} (+{time.perf_counter() - t0:.0f} s)", t, chunk, ref, out)
            for backend in (SDPBackend.CUDNN_ATTENTION,):
                try:
                    torch._dynamo.reset()
                    with sdpa_kernel(backend):
                        t, out = time_graph(lambda x, e=e2: e(normalize_uint8(x, torch.bfloat16)), tiles)
                    report(f"{label}, {backend.name}", t, chunk, ref, out)
                except Exception as e:  # noqa: BLE001
                    print(f"{label} {backend.name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch._dynamo.reset()
        e3 = build()
        whole = torch.compile(lambda x, e=e3: e(normalize_uint8(x, torch.bfloat16)), dynamic=False)
        t0 = time.perf_counter()
        t, out = time_graph(whole, tiles)
        report(f"whole encoder compiled (+{time.perf_counter() - t0:.0f} s)", t, chunk, ref, out)
        # fp8 linears (engine.quantize_vision), blocks compiled as the engine does
        torch._dynamo.reset()
        from batchvl.models.fp8 import quantize_model, use_activation_quantizer
        from kernels.fp8_quant import quantize_fp8_per_token
        holder = nn.Module()
        holder.vision = build()
        quantize_model(holder, vision=True)
        use_activation_quantizer(holder, quantize_fp8_per_token)
        for b in holder.vision.vit.blocks:
            b.forward = torch.compile(b.forward, dynamic=True)
        t, out = time_graph(lambda x, v=holder.vision: v(normalize_uint8(x, torch.bfloat16)), tiles)
        report("fp8 linears, blocks compiled", t, chunk, ref, out)
    pieces(CHUNKS[0])
    profile(CHUNKS[0])


def bench(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


def pieces(chunk):
    print(f"--- pieces, {chunk} tiles ({chunk * N} tokens)", flush=True)
    m = chunk * N
    x = torch.randn(m, 1024, device=dev, dtype=torch.bfloat16)
    h = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)
    for name, a, w in (("qkv 1024->3072", x, torch.randn(3072, 1024, device=dev, dtype=torch.bfloat16)),
                       ("proj 1024->1024", x, torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16)),
                       ("fc1 1024->4096", x, torch.randn(4096, 1024, device=dev, dtype=torch.bfloat16)),
                       ("fc2 4096->1024", h, torch.randn(1024, 4096, device=dev, dtype=torch.bfloat16))):
        bias = torch.randn(w.shape[0], device=dev, dtype=torch.bfloat16)
        t = bench(lambda a=a, w=w, bias=bias: torch.nn.functional.linear(a, w, bias))
        flop = 2 * m * w.shape[0] * w.shape[1]
        print(f"{name:<20} {t * 1e3:7.3f} ms  {flop / t / 1e12:6.1f} TFLOP/s  (x24 layers: {24 * t * 1e3:.1f} ms)",
              flush=True)
    qkv = torch.randn(chunk, N, 3, 16, 64, device=dev, dtype=torch.bfloat16)
    q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))  # strided [T, H, N, D], as the block passes them
    qc, kc, vc = (z.contiguous() for z in (q, k, v))
    flop = 4 * chunk * 16 * N * N * 64
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for label, args in (("strided", (q, k, v)), ("contiguous", (qc, kc, vc))):
            try:
                with sdpa_kernel(backend):
                    t = bench(lambda args=args: torch.nn.functional.scaled_dot_product_attention(*args))
                print(f"attention {backend.name:<20} {label:<10} {t * 1e3:7.3f} ms  {flop / t / 1e12:6.1f} TFLOP/s "
                      f"(x24: {24 * t * 1e3:.1f} ms)", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"attention {backend.name} {label}: failed: {type(e).__name__}: {str(e)[:150]}", flush=True)


def profile(chunk):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    torch._dynamo.reset()
    enc = build()
    for b in enc.vit.blocks:
        b.forward = torch.compile(b.forward, dynamic=True)
    tiles = torch.randint(0, 256, (chunk, 448, 448, 3), dtype=torch.uint8, device=dev)
    with torch.no_grad():
        for _ in range(2):
            enc(normalize_uint8(tiles, torch.bfloat16))
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                enc(normalize_uint8(tiles, torch.bfloat16))
            torch.cuda.synchronize()
    rows = [(e.device_time_total, e.count, e.key) for e in p.key_averages() if e.device_time_total > 0]
    total = sum(r[0] for r in rows)
    print(f"--- kernel profile, blocks compiled, 3 passes of {chunk} tiles: {total / 3e3:.1f} ms a pass", flush=True)
    for t, n, key in sorted(rows, reverse=True)[:22]:
        print(f"{t / 3e3:8.2f} ms/pass {100 * t / total:5.1f}%  x{n // 3:<4} {key[:110]}", flush=True)


if __name__ == "__main__":
    main()
