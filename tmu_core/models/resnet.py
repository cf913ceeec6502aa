"""CIFAR-style ResNet-18: 3x3 stem at stride 1, no max-pool, four stages of two basic blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tmu_core.models.cnn import init_conv_weights
from tmu_core.models.registry import Classifier, register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _stage(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1))


@register_model("resnet18")
class ResNet18(Classifier):
    """ResNet-18 for 32x32 images (about 11.2 M parameters); feature dimension 512."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        trunk = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            _stage(64, 64, 1),
            _stage(64, 128, 2),
            _stage(128, 256, 2),
            _stage(256, 512, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        super().__init__(trunk, 512, num_classes, in_channels, image_size, mean, std)
        init_conv_weights(self)
