"""InternViT-300M's attention at 1,025 tokens (a CLS token and 1,024 patches), in three forms (issue 17, item 3;
BENCHMARKS.md, session 9: attention is 26% of the tower, about 275 TFLOP/s counted at 1,025 tokens):

- `1025`: SDPA over all 1,025 tokens, as the tower runs it (cuDNN on the H200). Its 128-row query tiles and 64-key
  tiles leave a last tile with one token in each dimension.
- `1024`: SDPA over the 1,024 patches alone: what the same kernel does with no ragged tile (not the same result:
  the bound on what the next form can gain).
- `1025 flash`, `1025 efficient`, `1025 flex`: the same attention through SDPA's FlashAttention-2 and
  memory-efficient backends, and through FlexAttention (compiled, no mask): which kernel the tower should take.
- `split`: the patches' attention over the patches (cuDNN, with its log-sum-exp), the CLS key folded in after
  (one score per query, merged by log-sum-exp; compiled, so the merge is one fused kernel), and the CLS query's row
  on its own. The same result as `1025`, within bf16 rounding.

Prints each form's time per call and TFLOP/s counted at 1,025 tokens, and `split`'s error against `1025`.
Usage: python3 vit_attention.py [TILES]   (default 64, the engine's vision chunk; on the CPU it checks `split`
against the plain softmax at small sizes instead, as a check of this script).
"""
import sys

import torch
import torch.nn.functional as F
from device_timing import seconds_per_call  # this folder's

from batchvl.tools.shapes import VIT_300M

HEADS = VIT_300M["num_attention_heads"]
DIM = VIT_300M["hidden_size"] // HEADS


def lse_attention_cuda(q, k, v, scale):
    """(out, logsumexp) over k, v: cuDNN's attention, which also returns the row's log-sum-exp."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=scale)[:2]
    return out, lse.reshape(out.shape[:-1])  # cuDNN gives [B, H, N, 1]


def lse_attention_math(q, k, v, scale):
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype), lse


def split(q, k, v, scale, lse_attention):
    """Attention over [CLS, patches] (CLS first, as InternViT orders them) as the patches' own attention with the
    CLS key merged in by log-sum-exp, and the CLS query's row apart."""
    out, lse = lse_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], scale)  # [B, H, 1024, D], [B, H, 1024]
    cls_score = (q[:, :, 1:].float() * k[:, :, :1].float()).sum(-1) * scale  # [B, H, 1024]
    total = torch.logaddexp(lse.float(), cls_score)
    patches = torch.exp(lse.float() - total)[..., None] * out.float() + \
        torch.exp(cls_score - total)[..., None] * v[:, :, :1].float()
    cls = F.scaled_dot_product_attention(q[:, :, :1], k, v, scale=scale)
    return torch.cat([cls, patches.to(q.dtype)], dim=2)


def main():
    tiles = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    scale = DIM ** -0.5
    gen = torch.Generator().manual_seed(0)
    if not torch.cuda.is_available():  # the CPU check: the merge is exact against the plain softmax
        q, k, v = (torch.randn(2, 3, 17, 8, generator=gen, dtype=torch.float64) for _ in range(3))
        want = torch.softmax((q @ k.transpose(-1, -2)) * 8 ** -0.5, dim=-1) @ v
        got = split(q, k, v, 8 ** -0.5, lse_attention_math)
        print(f"cpu check: split against the plain softmax, max abs. error {(got - want).abs().max().item():.2e}")
        return
    q, k, v = (torch.randn(tiles, HEADS, 1025, DIM, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    flops = 4 * tiles * HEADS * 1025 * 1025 * DIM
    merged = torch.compile(lambda: split(q, k, v, scale, lse_attention_cuda))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)

    def backend(which):
        def run():
            with sdpa_kernel(which):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return run

    forms = {"1025": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
             "1024": lambda: F.scaled_dot_product_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], scale=scale),
             "split": merged,
             "1025 flash": backend(SDPBackend.FLASH_ATTENTION),
             "1025 efficient": backend(SDPBackend.EFFICIENT_ATTENTION),
             "1025 flex": lambda: flex(q, k, v, scale=scale),
             # the CLS token last: the 1,024 patch queries are one aligned block over all 1,025 keys, the CLS
             # query apart (what a tower that orders its tokens [patches, CLS] can run)
             "q 1024 x kv 1025": lambda: F.scaled_dot_product_attention(q[:, :, 1:], k, v, scale=scale),
             "q 1 x kv 1025": lambda: F.scaled_dot_product_attention(q[:, :, :1], k, v, scale=scale),
             "cls last, two calls": lambda: torch.cat([F.scaled_dot_product_attention(q[:, :, 1:], k, v, scale=scale),
                                                       F.scaled_dot_product_attention(q[:, :, :1], k, v, scale=scale)],
                                                      dim=2)}
    print(f"[{tiles}, {HEADS}, 1025, {DIM}] bf16 on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| form | ms a call | TFLOP/s (at 1,025 tokens) |\n|---|---|---|")
    for name, fn in forms.items():
        try:
            seconds = seconds_per_call(fn)
        except Exception as e:  # a backend that does not take this shape: say so, time the rest
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} | |")
            continue
        print(f"| {name} | {seconds * 1e3:.3f} | {flops / seconds / 1e12:.0f} |")
    want = forms["1025"]().float()
    err = (merged().float() - want).abs()
    print(f"split against 1025: max abs. error {err.max().item():.2e}, mean {err.mean().item():.2e} "
          f"(values of order {want.abs().mean().item():.2e})")


if __name__ == "__main__":
    main()
