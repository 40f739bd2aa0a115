"""One InternViT-300M block as the engine runs it (bf16, compiled, fc1 + GELU fused), over the engine's vision
chunk of 64 tiles x 1,025 tokens, in two token orders (issue 17, item 3):

- `cls first`: the tower's order, [CLS, patches]; attention over 1,025 queries and keys in one call;
- `cls last`: [patches, CLS]; the 1,024 patch queries in one call over all 1,025 keys, the CLS query in a
  second. Attention has no positions of its own (they are added in the embedding), so the two orders give the
  same tokens, permuted, within rounding.

Prints each form's time per block and the tower's tiles/s it implies (24 blocks), their largest difference, and
the ten kernels that take most of the `cls first` block's GPU time (torch.profiler).
Usage: python3 vit_block.py [TILES]   (default 64; on the CPU: 2 tiles in float32, as a check of this script)
"""
import sys
import types

import torch
import torch.nn.functional as F
from device_timing import seconds_per_call  # this folder's

from batchvl.models.internvit import VisionBlock, VisionSpec
from batchvl.tools.shapes import VIT_300M

SPEC = VisionSpec(hidden=VIT_300M["hidden_size"], layers=VIT_300M["num_hidden_layers"],
                  heads=VIT_300M["num_attention_heads"], intermediate=VIT_300M["intermediate_size"],
                  image_size=VIT_300M["image_size"], patch_size=VIT_300M["patch_size"])


def forward_cls_last(self, x):
    """VisionBlock.forward for tokens ordered [patches, CLS]."""
    t, n, c = x.shape
    q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
    q, k, v = (z.view(t, n, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
    a = torch.cat([F.scaled_dot_product_attention(q[:, :, : n - 1], k, v),
                   F.scaled_dot_product_attention(q[:, :, n - 1 :], k, v)], dim=2)
    x = x + self.ls1 * self.proj(a.transpose(1, 2).reshape(t, n, c))
    return x + self.ls2 * self.fc2(self._fc1_gelu(self.norm2(x)))


def main():
    cuda = torch.cuda.is_available()
    tiles = int(sys.argv[1]) if len(sys.argv) > 1 else (64 if cuda else 2)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    block = VisionBlock(SPEC).to(device)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
        block.ls1.fill_(0.5)
        block.ls2.fill_(0.5)
    block = block.to(dtype).eval()
    block.fused_gelu = cuda
    last = VisionBlock(SPEC).to(device, dtype).eval()
    last.load_state_dict(block.state_dict())
    last.fused_gelu = cuda
    last.forward = types.MethodType(forward_cls_last, last)
    if cuda:
        block.forward = torch.compile(block.forward, dynamic=True)
        last.forward = torch.compile(last.forward, dynamic=True)
    x = torch.randn(tiles, 1025, 1024, device=device, dtype=dtype)
    x_last = torch.cat([x[:, 1:], x[:, :1]], dim=1)
    with torch.inference_mode():
        want, got = block(x), last(x_last)
        err = (torch.cat([got[:, -1:], got[:, :-1]], dim=1).float() - want.float()).abs()
        print(f"[{tiles}, 1025, 1024] {dtype} on {torch.cuda.get_device_name() if cuda else 'cpu'}, "
              f"torch {torch.__version__}")
        print(f"cls last against cls first: max abs. difference {err.max().item():.2e}, mean {err.mean().item():.2e} "
              f"(values of order {want.float().abs().mean().item():.2e})")
        if not cuda:
            return
        print("| form | ms a block | tower tiles/s (24 blocks) |\n|---|---|---|")
        for name, fn in {"cls first": lambda: block(x), "cls last": lambda: last(x_last)}.items():
            seconds = seconds_per_call(fn)
            print(f"| {name} | {seconds * 1e3:.3f} | {tiles / (24 * seconds):.0f} |")
        for name, fn, inp in (("cls first", block, x), ("cls last", last, x_last)):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn(inp)
                torch.cuda.synchronize()
            print(f"{name}: the kernels, 5 blocks")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=70))


if __name__ == "__main__":
    main()
