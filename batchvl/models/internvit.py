"""InternViT, the vision tower, and the InternVL projector.

One module covers both sizes: InternViT-300M (LayerNorm, qkv bias, layer scale) and InternViT-6B (RMSNorm,
no qkv bias, and q/k RMS normalisation over the full hidden width before the split into heads). Every
tile is one sequence of 1 + (S/patch)^2 tokens; the CLS token is dropped after the selected layer, the
patch grid is pixel-shuffled (downsample 0.5: 4 neighbours into one token of 4x the width) and the
projector (LayerNorm -> Linear -> GELU -> Linear) maps it to the language model's width.

Two forms are ours rather than the reference's, for speed on the GPU (issue 17; BENCHMARKS.md, session 6):
- The patch embedding is a matrix product over the flattened patches, not a convolution: a convolution whose
  stride is its kernel size is exactly that product. cuDNN ran the 14x14 convolution as an implicit GEMM at 4% of
  the 300M tower's time, the product takes a tenth of that.
- With `fused_gelu`, an MLP's first linear layer and its GELU are one cuBLASLt call whose epilogue applies
  GELU's tanh approximation (`linear_gelu_tanh`), instead of a product and a separate pass over its 4x-wide
  output (10% of the tower's time). InternViT is trained with exact GELU; the approximation's error (5e-4 at
  most) is far below bf16's rounding, and on the H200 the bf16 tower's error against float32 exact GELU was the
  same with it and without (BENCHMARKS.md, session 6). So the engine uses it in 16-bit dtypes
  (`engine.fused_vision_gelu`, on by default) and never in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from batchvl.models.layers import linear_gelu_tanh, make_norm


@dataclass(frozen=True)
class VisionSpec:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int
    norm: str = "layer"  # layer | rms
    eps: float = 1e-6
    qkv_bias: bool = True
    qk_norm: bool = False
    select_layer: int = -1  # which layer's output feeds the projector; -1 = the last
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    llm_hidden: int = 0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def layers_to_run(self) -> int:
        """Layers whose output is needed: hidden state index L + 1 + select_layer (0 is the embeddings)."""
        n = self.layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
        if not 0 < n <= self.layers:
            raise ValueError(f"select_layer {self.select_layer} is outside a {self.layers}-layer tower")
        return n

    @property
    def tokens_per_tile(self) -> int:
        return int(self.grid * self.downsample_ratio) ** 2


class VisionBlock(nn.Module):
    def __init__(self, s: VisionSpec):
        super().__init__()
        self.heads = s.heads
        self.norm1 = make_norm(s.norm, s.hidden, s.eps)
        self.qkv = nn.Linear(s.hidden, 3 * s.hidden, bias=s.qkv_bias)
        self.q_norm = make_norm("rms", s.hidden, s.eps) if s.qk_norm else None
        self.k_norm = make_norm("rms", s.hidden, s.eps) if s.qk_norm else None
        self.proj = nn.Linear(s.hidden, s.hidden)
        self.ls1 = nn.Parameter(torch.ones(s.hidden))
        self.norm2 = make_norm(s.norm, s.hidden, s.eps)
        self.fc1 = nn.Linear(s.hidden, s.intermediate)
        self.fc2 = nn.Linear(s.intermediate, s.hidden)
        self.ls2 = nn.Parameter(torch.ones(s.hidden))
        self.fused_gelu = False  # fc1 + GELU (tanh approximation) in one call: see the module docstring

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, N, C]
        t, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
        if self.q_norm is not None:  # over the full width, not per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.view(t, n, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # [T, H, N, D]
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.ls1 * self.proj(a.transpose(1, 2).reshape(t, n, c))
        return x + self.ls2 * self.fc2(self._fc1_gelu(self.norm2(x)))

    def _fc1_gelu(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = self.fc1
        if self.fused_gelu and isinstance(fc1, nn.Linear) and fc1.bias is not None:  # not an fp8 layer
            return linear_gelu_tanh(x, fc1.weight, fc1.bias)
        return F.gelu(fc1(x))


class InternViT(nn.Module):
    def __init__(self, s: VisionSpec):
        super().__init__()
        self.spec = s
        self.patch_embed = nn.Conv2d(3, s.hidden, kernel_size=s.patch_size, stride=s.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, s.hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, s.grid * s.grid + 1, s.hidden))
        self.blocks = nn.ModuleList(VisionBlock(s) for _ in range(s.layers_to_run))
        self.patch_linear = F.linear  # the patch embedding's product (the deterministic mode swaps it)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [T, 3, S, S] -> features of the selected layer [T, 1 + grid^2, C]."""
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x)
        return x

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [T, 3, S, S] -> the CLS token and the patch embeddings, with positions: [T, 1 + grid^2, C].
        The patch embedding is the convolution's own weights as one matrix product over the patches."""
        conv = self.patch_embed
        weight = conv.weight  # [C, 3, p, p]
        patches = patchify(pixels.to(weight.dtype), self.spec.patch_size)  # [T, grid^2, 3 * p * p]
        x = self.patch_linear(patches, weight.reshape(weight.shape[0], -1), conv.bias)  # [T, N, C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[T, 3, S, S] -> [T, (S/p)^2, 3 * p * p]: each patch flattened channel-major, as a convolution's weight
    [C, 3, p, p] is, patches in row-major order of the grid, as the convolution's output flattens."""
    t, c, h, w = pixels.shape
    x = pixels.reshape(t, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(t, (h // patch) * (w // patch), c * patch * patch)


class Projector(nn.Module):
    """InternVL's `mlp1`: LayerNorm -> Linear -> GELU -> Linear, from the shuffled vision width."""

    def __init__(self, s: VisionSpec):
        super().__init__()
        width = s.hidden * int(round(1 / s.downsample_ratio)) ** 2
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.fc1 = nn.Linear(width, s.llm_hidden)
        self.fc2 = nn.Linear(s.llm_hidden, s.llm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def pixel_shuffle(x: torch.Tensor, ratio: float, version: str) -> torch.Tensor:
    """[T, W, H, C] -> [T, W*r, H*r, C/r^2], InternVL's space-to-depth. v2 swaps the spatial axes back; v1
    (InternVL 1.x checkpoints) leaves them transposed, and the model was trained that way."""
    t, w, h, c = x.shape
    x = x.reshape(t, w, int(h * ratio), int(c / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(t, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3) if version != "v1" else x


class VisionEncoder(nn.Module):
    """Tiles in, language-model embeddings out: [T, 3, S, S] -> [T, tokens_per_tile, llm_hidden]."""

    def __init__(self, s: VisionSpec):
        super().__init__()
        self.spec = s
        self.vit = InternViT(s)
        self.projector = Projector(s)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.spec
        x = self.vit(pixels)[:, 1:, :]  # drop CLS: [T, grid^2, C]
        x = x.reshape(x.shape[0], s.grid, s.grid, -1)
        x = pixel_shuffle(x, s.downsample_ratio, s.ps_version)
        return self.projector(x.reshape(x.shape[0], -1, x.shape[-1]))
