"""The Triton decode attention's launch settings (issue 17, session 11): a whole decode step's attention calls, one a
layer over that layer's own cache, captured as one CUDA graph and replayed, for each chunk (positions a split),
block_n (positions a loop step), num_warps and num_stages, at the 1B's and the 8B's decode shapes with 7-tile
caption lengths (about 1,800 to 1,960 positions of a 2,048 span). Session 9's trace put the 1B's attention at
1.05 ms of a 3.0 ms step, about 2.8 TB/s. Each setting's error against float32 attention is printed beside it.

With `mixed`, the lengths are `mixed`'s instead: anything from a short prompt to the whole span (1 to 4,096): where
rows are short, fewer positions a split leave more programs to share the longest rows' work (session 11's pipeline
run with chunk 1024 had a slower `mixed` decode stage).

Usage: python3 decode_tune.py [mixed]   (on the CPU, under TRITON_INTERPRET=1, it checks one small case's error only)
"""
import itertools
import os
import sys

import torch
import torch.nn.functional as F

SHAPES = {  # name: (rows, heads, kv heads, head dim, layers)
    "internvl2-1b (qwen2-0.5b)": (128, 14, 2, 64, 24),
    "internvl3-8b (qwen2.5-7b)": (64, 28, 4, 128, 28),
}
MIXED = sys.argv[1:] == ["mixed"]
SPAN = 4096 if MIXED else 2048
SETTINGS = [dict(chunk=c, block_n=n, num_warps=w, num_stages=s)
            for c, n, w, s in itertools.product((256, 512, 1024), (32, 64, 128), (4, 8), (2, 3, 4)) if n <= c]
DEFAULT = dict(chunk=512, block_n=64, num_warps=4, num_stages=2)


def reference(q, k, v, lengths):
    mask = (torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None])[:, None, None]
    out = F.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(), attn_mask=mask,
                                         enable_gqa=True)
    return out[:, :, 0]


def main():
    from batchvl.kernels import decode_attention

    cuda = torch.cuda.is_available()
    if not cuda:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("on the CPU, run under TRITON_INTERPRET=1")
        q, k, v = torch.randn(2, 4, 16), torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
        lengths = torch.tensor([40, 64])
        for s in (DEFAULT, dict(chunk=32, block_n=16, num_warps=4, num_stages=2)):
            err = (decode_attention(q, k, v, lengths, **s) - reference(q, k, v, lengths)).abs().max().item()
            print(s, f"max abs. error {err:.1e}")
        return
    print(f"decode attention settings on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, (rows, heads, kv_heads, d, layers) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(rows + heads)
        q = torch.randn(rows, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        caches = [(torch.randn(rows, kv_heads, SPAN, d, device="cuda", dtype=torch.bfloat16, generator=gen),
                   torch.randn(rows, kv_heads, SPAN, d, device="cuda", dtype=torch.bfloat16, generator=gen))
                  for _ in range(layers)]
        low, high = (1, SPAN + 1) if MIXED else (SPAN - 250, SPAN - 90)
        lengths = torch.randint(low, high, (rows,), device="cuda", generator=gen)
        ref = reference(q, *caches[0], lengths)
        moved = int(lengths.sum()) * kv_heads * d * 2 * 2 * layers  # K and V bytes a step reads
        print(f"\n{name}: {rows} rows, {heads}/{kv_heads} heads, D {d}, {layers} layers, span {SPAN}, "
              f"{moved / 1e9:.2f} GB of keys and values a step")
        print("| chunk | block_n | warps | stages | ms a step | TB/s | vs default | max abs. error |")
        print("|---" * 8 + "|")
        results = []
        for s in [DEFAULT] + [x for x in SETTINGS if x != DEFAULT]:
            try:
                err = (decode_attention(q, *caches[0], lengths, **s).float() - ref).abs().max().item()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for k, v in caches:
                        decode_attention(q, k, v, lengths, **s)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for k, v in caches:
                        decode_attention(q, k, v, lengths, **s)
                graph.replay()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / 20
                del graph
            except Exception as e:  # noqa: BLE001 - a setting out of shared memory, say: say so and go on
                print(f"| {s['chunk']} | {s['block_n']} | {s['num_warps']} | {s['num_stages']} | failed: "
                      f"{type(e).__name__} | | | |")
                continue
            results.append((ms, s, err))
        base = results[0][0]
        for ms, s, err in sorted(results, key=lambda r: r[0])[:12] + [results[0]]:
            print(f"| {s['chunk']} | {s['block_n']} | {s['num_warps']} | {s['num_stages']} | {ms:.3f} "
                  f"| {moved / ms / 1e9:.2f} | {base / ms:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
