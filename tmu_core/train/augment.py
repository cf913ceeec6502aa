"""CIFAR-style augmentation on whole batches of tensors: random crop with zero padding, horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Randomly crop each image from its zero-padded copy and flip half of them left-right.

    Random numbers come from ``gen`` (a CPU generator), so the result depends only on its state,
    never on the global RNG or on the device.

    Args:
        x: float images (N, C, H, W) on any device.
        padding: zero padding on each side before cropping back to H x W.
        gen: CPU generator that drives the offsets and flips.

    Returns:
        Augmented images (N, C, H, W) on the same device; on the CPU in channels-last memory order.
    """
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))  # (N, C, H + 2p, W + 2p)
    rows = offsets[0].to(dev)[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = offsets[1].to(dev)[:, None] + torch.arange(w, device=dev)  # (N, W)
    cols = torch.where(flips.to(dev)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice: the result is (N, H, W, C), so its (N, C, H, W) view is
    # already in channels-last order, which the CPU keeps (tmu_core.device.cpu_layout).
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return out if out.device.type == "cpu" else out.contiguous()
