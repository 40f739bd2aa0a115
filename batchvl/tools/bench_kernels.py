"""`batchvl bench-kernels`: each Triton kernel on the GPU, checked against a torch reference, then timed.

For decode attention: random bf16 queries and caches of the real models' head layouts, one query per row,
each row attending to its own length. The reference is float32 attention on the upcast inputs. Both the
kernel and what the engine would otherwise run (SDPA over the whole span under a mask, with grouped-query
attention) are compared with it and timed; `GB/s` counts the bytes that must be read (each row's valid
keys and values once, the queries) and written.

For per-token fp8 quantization: random bf16 activations of the linears' input widths (rows scaled over four
decades, as activations are), at decode and prefill row counts. The kernel's q must equal the eager torch
reference's bit for bit (the table counts differing bytes) and its scales must equal the reference's; both are
timed, and `GB/s` counts the bytes that must move: the input read once, q and the scales written. The fused
RMSNorm + quantization kernel is compared with its eager reference (it matches closely, not bit for bit: see
kernels/rmsnorm_fp8_quant.py) and timed against it and against RMSNorm followed by the per-token kernel.

Speed is printed, never asserted.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

# name -> (query heads, KV heads, head dim), from the published configs
HEAD_LAYOUTS = {
    "qwen2-0.5b": (14, 2, 64),
    "internlm2-1.8b": (16, 8, 128),
    "qwen2.5-7b": (28, 4, 128),
    "internlm2.5-7b": (32, 8, 128),
    "internlm2-20b": (48, 8, 128),
}

# The input widths of the fp8 linears: Qwen2.5-7B's hidden size (qkv, gate_up), Llama-3-70B's hidden size,
# Qwen2.5-7B's intermediate size (down).
FP8_WIDTHS = (3584, 8192, 18944)
FP8_ROWS = (64, 256, 16384)  # decode batches, a prefill chunk of tokens


def _sdpa(q, k, v, lengths):
    span = k.shape[2]
    mask = (torch.arange(span, device=q.device)[None, :] < lengths[:, None])[:, None, None]  # [B, 1, 1, S]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])[:, :, 0]


def _rel(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


def check_decode_attention(rows: tuple[int, ...], span: int, lengths_kind: str, chunks: tuple[int, ...]) -> list[str]:
    """Markdown table rows: error against float32 and median time of the kernel and of SDPA."""
    import triton.testing

    from batchvl.kernels import decode_attention

    dev = torch.device("cuda")
    lines = []
    for name, (heads, kv_heads, d) in HEAD_LAYOUTS.items():
        for b in rows:
            gen = torch.Generator(device=dev).manual_seed(b * 1000 + heads)
            q = torch.randn(b, heads, d, device=dev, dtype=torch.bfloat16, generator=gen)
            k = torch.randn(b, kv_heads, span, d, device=dev, dtype=torch.bfloat16, generator=gen)
            v = torch.randn(b, kv_heads, span, d, device=dev, dtype=torch.bfloat16, generator=gen)
            if lengths_kind == "caption":  # 7-tile captions: prompts of ~1,830 tokens, up to 128 generated
                lengths = torch.randint(span - 250, span - 90, (b,), device=dev, generator=gen)
            else:  # anything from a short text prompt to the whole span
                lengths = torch.randint(1, span + 1, (b,), device=dev, generator=gen)
            ref = _sdpa(q.float(), k.float(), v.float(), lengths)
            sdpa_ms = triton.testing.do_bench(lambda q=q, k=k, v=v, n=lengths: _sdpa(q, k, v, n),
                                              return_mode="median")
            sdpa_err = _rel(_sdpa(q, k, v, lengths), ref)
            useful = (int(lengths.sum()) * kv_heads * d * 2 + b * heads * d * 2) * 2  # bytes read + written
            for chunk in chunks:
                out = decode_attention(q, k, v, lengths, chunk=chunk)
                err = _rel(out, ref)
                ms = triton.testing.do_bench(lambda q=q, k=k, v=v, n=lengths, c=chunk: decode_attention(q, k, v, n, c),
                                             return_mode="median")
                lines.append(f"| {name} | {b} | {span} | {lengths_kind} | {chunk} | {err:.1e} | {sdpa_err:.1e} "
                             f"| {ms * 1e3:.0f} | {sdpa_ms * 1e3:.0f} | {sdpa_ms / ms:.2f} | {useful / ms / 1e6:.0f} |")
    return lines


def check_fp8_quant(rows: tuple[int, ...] = FP8_ROWS, widths: tuple[int, ...] = FP8_WIDTHS) -> list[str]:
    """Markdown table rows: the kernel's agreement with the eager reference, and both median times."""
    import triton.testing

    from batchvl.kernels import quantize_fp8_per_token
    from batchvl.kernels.fp8_quant import quantize_fp8_per_token_reference

    dev = torch.device("cuda")
    lines = []
    for k in widths:
        for m in rows:
            gen = torch.Generator(device=dev).manual_seed(m * 100_000 + k)
            x = torch.randn(m, k, device=dev, generator=gen)
            x = (x * torch.logspace(-2, 2, m, device=dev)[:, None]).to(torch.bfloat16)  # [M, K]
            q, scale = quantize_fp8_per_token(x)
            ref_q, ref_scale = quantize_fp8_per_token_reference(x)
            q_diff = int((q.view(torch.uint8) != ref_q.view(torch.uint8)).sum())
            scale_diff = int((scale != ref_scale).sum())
            ms = triton.testing.do_bench(lambda x=x: quantize_fp8_per_token(x), return_mode="median")
            ref_ms = triton.testing.do_bench(lambda x=x: quantize_fp8_per_token_reference(x), return_mode="median")
            moved = m * k * (x.element_size() + 1) + m * 4  # read x once, write q and the scales
            lines.append(f"| {m} | {k} | {q_diff} | {scale_diff} | {ms * 1e3:.1f} | {ref_ms * 1e3:.1f} "
                         f"| {ref_ms / ms:.2f} | {moved / ms / 1e6:.0f} | {moved / ref_ms / 1e6:.0f} |")
            del x, q, scale, ref_q, ref_scale
    return lines


def _fp8_edge_rows(dtype: torch.dtype) -> torch.Tensor:
    """[8, 1011] rows, on the CPU, that the rounding and the scale find hardest: every e4m3 value, each tie
    between neighbours and the floats beside it, both signs (the row holds 448, so its scale is 1); a zero row;
    an outlier pushing the rest into e4m3's subnormals; rows near the dtype's largest and smallest normals (the
    latter under EPS for bfloat16 and float32), and one just over EPS."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # +0 .. 448
    mid = (grid[:-1] + grid[1:]) / 2
    ties = torch.cat([grid, mid, torch.nextafter(mid, torch.zeros(1)), torch.nextafter(mid, torch.full((1,), 1e9))])
    row = torch.cat([ties, -ties, torch.tensor([448.0])])
    noise = torch.randn(4, row.numel(), generator=torch.Generator().manual_seed(0))
    finfo = torch.finfo(dtype)
    outlier = noise[0].clone()
    outlier[7] = 1e5
    rows = torch.stack([row, torch.zeros_like(row), -torch.zeros_like(row), outlier, noise[1],
                        noise[2] * finfo.max / 8, noise[3] * finfo.tiny, noise[3] * max(finfo.tiny, 1e-11)])
    return rows.clamp(finfo.min, finfo.max).to(dtype)


def check_fp8_quant_edges() -> list[str]:
    """Markdown table rows: on the edge rows, the kernel against the reference on the GPU, and the reference on
    the GPU against the reference on the CPU (torch's division and fp8 cast agree across devices)."""
    from batchvl.kernels import quantize_fp8_per_token
    from batchvl.kernels.fp8_quant import quantize_fp8_per_token_reference

    lines = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = _fp8_edge_rows(dtype)
        q, scale = quantize_fp8_per_token(x.cuda())
        ref_q, ref_scale = quantize_fp8_per_token_reference(x.cuda())
        cpu_q, cpu_scale = quantize_fp8_per_token_reference(x)
        kernel_q = int((q.view(torch.uint8) != ref_q.view(torch.uint8)).sum())
        kernel_scale = int((scale != ref_scale).sum())
        device_q = int((ref_q.view(torch.uint8).cpu() != cpu_q.view(torch.uint8)).sum())
        device_scale = int((ref_scale.cpu() != cpu_scale).sum())
        lines.append(f"| {str(dtype).removeprefix('torch.')} | {x.numel()} | {kernel_q} | {kernel_scale} "
                     f"| {device_q} | {device_scale} |")
    return lines


def check_rmsnorm_fp8_quant(rows: tuple[int, ...] = FP8_ROWS, widths: tuple[int, ...] = FP8_WIDTHS) -> list[str]:
    """Markdown table rows: the fused kernel against the eager reference (agreement, times), and the unfused
    path it replaces in the decoder (batchvl's RMSNorm, then the per-token kernel)."""
    import triton.testing

    from batchvl.kernels import quantize_fp8_per_token, rmsnorm_quantize_fp8
    from batchvl.kernels.rmsnorm_fp8_quant import MAX_K, rmsnorm_quantize_fp8_reference
    from batchvl.models.layers import RMSNorm

    dev = torch.device("cuda")
    lines = []
    for k in (w for w in widths if w <= MAX_K):
        norm = RMSNorm(k, eps=1e-6).to(dev, torch.bfloat16)
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.3)
        weight = norm.weight.detach()
        for m in rows:
            gen = torch.Generator(device=dev).manual_seed(m * 100_000 + k)
            x = torch.randn(m, k, device=dev, generator=gen)
            x = (x * torch.logspace(-2, 2, m, device=dev)[:, None]).to(torch.bfloat16)  # [M, K]
            q, scale = rmsnorm_quantize_fp8(x, weight, 1e-6)
            ref_q, ref_scale = rmsnorm_quantize_fp8_reference(x, weight, 1e-6)
            steps = (q.view(torch.uint8).int() - ref_q.view(torch.uint8).int()).abs()
            scale_rel = ((scale - ref_scale).abs() / ref_scale).max().item()
            with torch.no_grad():
                ms = triton.testing.do_bench(lambda x=x, w=weight: rmsnorm_quantize_fp8(x, w, 1e-6),
                                             return_mode="median")
                ref_ms = triton.testing.do_bench(lambda x=x, w=weight: rmsnorm_quantize_fp8_reference(x, w, 1e-6),
                                                 return_mode="median")
                two_ms = triton.testing.do_bench(lambda x=x, n=norm: quantize_fp8_per_token(n(x)),
                                                 return_mode="median")
            moved = m * k * (x.element_size() + 1) + k * weight.element_size() + m * 4
            lines.append(f"| {m} | {k} | {int(steps.count_nonzero())} | {int(steps.max())} | {scale_rel:.1e} "
                         f"| {ms * 1e3:.1f} | {ref_ms * 1e3:.1f} | {two_ms * 1e3:.1f} | {ref_ms / ms:.2f} "
                         f"| {two_ms / ms:.2f} | {moved / ms / 1e6:.0f} |")
            del x, q, scale, ref_q, ref_scale, steps
    return lines


KERNELS = ("decode-attention", "fp8-quant", "rmsnorm-fp8-quant")


def _table(title: str, columns: list[str], lines: Iterable[str]) -> None:
    """A markdown table: an optional title line, the header, then each row as it is measured."""
    if title:
        print(f"\n{title}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for line in lines:
        print(line, flush=True)


def main(rows: tuple[int, ...] = (64, 128, 256), span: int = 2048, chunks: tuple[int, ...] = (256, 512),
         kernels: tuple[str, ...] = KERNELS) -> int:
    if not torch.cuda.is_available():
        print("bench-kernels needs a CUDA GPU (the CPU tests run the kernels in Triton's interpreter)")
        return 1
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if "decode-attention" in kernels:
        _table("", ["heads of", "rows", "span", "lengths", "chunk", "kernel err vs fp32", "SDPA err vs fp32",
                    "kernel us", "SDPA us", "speed-up", "kernel GB/s"],
               (line for kind in ("caption", "mixed") for line in check_decode_attention(rows, span, kind, chunks)))
    if "fp8-quant" in kernels:
        _table("Per-token fp8 quantization on edge rows (all must be 0)",
               ["dtype", "values", "kernel q bytes differing", "kernel scales differing", "reference GPU vs CPU q",
                "reference GPU vs CPU scales"], check_fp8_quant_edges())
        _table("Per-token fp8 quantization, bf16 input: the kernel against the eager torch reference",
               ["rows", "K", "q bytes differing", "scales differing", "kernel us", "eager us", "speed-up",
                "kernel GB/s", "eager GB/s"], check_fp8_quant())
    if "rmsnorm-fp8-quant" in kernels:
        _table("RMSNorm fused with per-token fp8 quantization, bf16 input: the kernel against the eager reference "
               "and against RMSNorm then the per-token kernel",
               ["rows", "K", "q bytes differing", "most e4m3 steps apart", "scale rel diff", "fused us", "eager us",
                "norm + kernel us", "vs eager", "vs norm + kernel", "fused GB/s"], check_rmsnorm_fp8_quant())
    return 0
