"""Plain convolutional networks: ``small_cnn`` (fast on a CPU) and ``allcnn`` (All-CNN-C)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from tmu_core.models.registry import Classifier, register_model


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    """Conv (no bias, batch norm follows) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def _pool_head() -> nn.Sequential:
    """Global average pool -> (N, C)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


@register_model("small_cnn")
class SmallCNN(Classifier):
    """About 0.14 M parameters: five conv-bn-relu blocks, three 2x2 max-pools and a global average pool.

    Works for any input size: the pools round up (``ceil_mode``), so an 8x8 digit ends at 1x1.
    Feature dimension 128.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        trunk = nn.Sequential(
            conv_bn_relu(in_channels, 32),
            nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(32, 64),
            conv_bn_relu(64, 64),
            nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(64, 128),
            nn.MaxPool2d(2, ceil_mode=True),
            _pool_head(),
        )
        super().__init__(trunk, 128, num_classes, in_channels, image_size, mean, std)
        init_conv_weights(self)


@register_model("allcnn")
class AllCNN(Classifier):
    """All-CNN-C (Springenberg et al. 2014) with batch norm after every convolution.

    Strided 3x3 convolutions replace pooling. The paper's last layer, a 1x1 convolution to the classes
    followed by global averaging, equals global averaging followed by a linear layer, so the class layer
    here is the shared linear ``head`` on 192 averaged features. The paper's dropout is left out
    (batch norm regularises). The 3x3 "valid" convolution pads only when the map is smaller than 3x3.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        after_strides = -(-(-(-image_size // 2)) // 2)  # ceil(ceil(s / 2) / 2)
        valid_pad = 0 if after_strides >= 3 else 1
        trunk = nn.Sequential(
            conv_bn_relu(in_channels, 96),
            conv_bn_relu(96, 96),
            conv_bn_relu(96, 96, stride=2),
            conv_bn_relu(96, 192),
            conv_bn_relu(192, 192),
            conv_bn_relu(192, 192, stride=2),
            conv_bn_relu(192, 192, padding=valid_pad),
            conv_bn_relu(192, 192, kernel=1, padding=0),
            _pool_head(),
        )
        super().__init__(trunk, 192, num_classes, in_channels, image_size, mean, std)
        init_conv_weights(self)


def init_conv_weights(model: nn.Module) -> None:
    """He (fan-out) initialisation for convolutions, unit batch-norm scale."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
