"""``vit_small``: a small Vision Transformer for small images (CIFAR-sized data sets).

Patch size 4 on 32x32 images (64 tokens plus a class token), width 192, depth 6, 3 heads, MLP ratio 2.
Attention is written out with matmuls so that ``torch.onnx.export(dynamo=False)`` needs no special op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tmu_core.errors import InvalidInputError
from tmu_core.models.registry import Classifier, register_model


def choose_patch_size(image_size: int) -> int:
    """The largest of 4, 2, 1 that divides ``image_size`` and leaves at least a 4x4 grid of patches."""
    for patch in (4, 2, 1):
        if image_size % patch == 0 and image_size // patch >= 4:
            return patch
    return 1


class Attention(nn.Module):
    """Multi-head self-attention over (N, T, D) tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise InvalidInputError(f"ViT width {dim} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (N, heads, T, d_head)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, t, d)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTTrunk(nn.Module):
    """Patch embedding, class token, learned positions, blocks; returns the normed class token (N, D)."""

    def __init__(self, in_channels: int, image_size: int, dim: int, depth: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.image_size = image_size
        self.patch = choose_patch_size(image_size)
        tokens = (image_size // self.patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, self.patch, stride=self.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise InvalidInputError(
                f"vit_small was built for {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}"
            )
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, T, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos
        return self.norm(self.blocks(tokens))[:, 0]


@register_model("vit_small")
class ViTSmall(Classifier):
    """ViT with width 192, depth 6, 3 heads (about 1.8 M parameters at 32x32); feature dimension 192.

    Only accepts images of the size it was built for (the position embedding is fixed).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        trunk = ViTTrunk(in_channels, image_size, dim=192, depth=6, heads=3, mlp_ratio=2)
        super().__init__(trunk, 192, num_classes, in_channels, image_size, mean, std)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
