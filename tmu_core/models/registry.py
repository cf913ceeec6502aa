"""The architecture registry and the ``Classifier`` base every model derives from.

A model takes float images in [0, 1] of shape (N, C, H, W); the per-channel mean/std normalisation lives
inside the model as buffers, so an exported ONNX graph and a TorchServe worker need no preprocessing
beyond ``x.float() / 255``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

from tmu_core.errors import InvalidInputError

logger = logging.getLogger(__name__)

Builder = Callable[..., "Classifier"]
B = TypeVar("B", bound=Callable[..., "Classifier"])

_REGISTRY: dict[str, Builder] = {}
# "prefix" -> builder(name, num_classes=..., in_channels=..., image_size=..., mean=..., std=...) for "prefix:name".
_NAMESPACES: dict[str, Callable[..., "Classifier"]] = {}


class Classifier(nn.Module):
    """Base of every architecture: ``forward(x) = head(features(x))``.

    Subclasses build ``self.trunk``, a module that maps normalised images (N, C, H, W) to penultimate
    activations (N, D); this class adds the normalisation buffers and the linear ``head``.

    Attributes:
        arch: the registry name the model was built under.
        num_classes: number of logits.
        in_channels: image channels (3 for RGB, 1 for greyscale).
        image_size: the side of the square images the model was built for.
        feature_dim: D, the width of ``features(x)``.
        head: ``nn.Linear(feature_dim, num_classes)``.
    """

    arch: str = ""

    def __init__(
        self,
        trunk: nn.Module,
        feature_dim: int,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        _check_shape_args(num_classes, in_channels, image_size)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.feature_dim = feature_dim
        mean_t, std_t = _norm_buffers(in_channels, mean, std)
        self.register_buffer("mean", mean_t)  # (1, C, 1, 1)
        self.register_buffer("std", std_t)  # (1, C, 1, 1)
        self.trunk = trunk
        self.head = nn.Linear(feature_dim, num_classes)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std, channel-wise, for float images in [0, 1]."""
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, D) for float images (N, C, H, W) in [0, 1]."""
        return self.trunk(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for float images (N, C, H, W) in [0, 1]."""
        return self.head(self.features(x))


def _check_shape_args(num_classes: int, in_channels: int, image_size: int) -> None:
    for name, value, low in (("num_classes", num_classes, 2), ("in_channels", in_channels, 1),
                             ("image_size", image_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")


def _norm_buffers(
    in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std buffers of shape (1, C, 1, 1); ``None`` means no shift (0) or no scaling (1)."""
    mean_list = [0.0] * in_channels if mean is None else [float(v) for v in mean]
    std_list = [1.0] * in_channels if std is None else [float(v) for v in std]
    for name, values in (("mean", mean_list), ("std", std_list)):
        if len(values) != in_channels:
            raise InvalidInputError(
                f"{name} needs one value per channel ({in_channels}), got {len(values)}: {values}"
            )
    if any(not v > 0 for v in std_list):
        raise InvalidInputError(f"std values must all be > 0, got {std_list}")
    mean_t = torch.tensor(mean_list, dtype=torch.float32).view(1, in_channels, 1, 1)
    std_t = torch.tensor(std_list, dtype=torch.float32).view(1, in_channels, 1, 1)
    return mean_t, std_t


def register_model(name: str) -> Callable[[B], B]:
    """Decorator that adds a builder (a ``Classifier`` subclass or a function) to the registry.

    The builder is called as ``builder(num_classes=..., in_channels=..., image_size=..., mean=..., std=...)``.

    Args:
        name: lowercase registry key, e.g. ``"small_cnn"``.

    Raises:
        InvalidInputError: the name is empty, not lowercase, or already registered.
    """
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise InvalidInputError(f"model name must be lowercase letters, digits and '_', got {name!r}")

    def wrap(builder: B) -> B:
        if name in _REGISTRY:
            raise InvalidInputError(f"model {name!r} is already registered (by {_REGISTRY[name]!r})")
        _REGISTRY[name] = builder
        if isinstance(builder, type) and issubclass(builder, Classifier):
            builder.arch = name  # also right when the class is instantiated directly
        return builder

    return wrap


def register_namespace(prefix: str, builder: Callable[..., "Classifier"]) -> None:
    """Route every architecture named ``"<prefix>:<name>"`` to ``builder(name, num_classes=..., ...)``.

    Imported architectures (``torchvision:resnet50``) are rebuilt this way from a checkpoint's ``meta.arch``.

    Raises:
        InvalidInputError: the prefix is not lowercase or is already taken.
    """
    if not prefix or prefix != prefix.lower() or not prefix.isalnum():
        raise InvalidInputError(f"namespace must be lowercase letters and digits, got {prefix!r}")
    if prefix in _NAMESPACES:
        raise InvalidInputError(f"namespace {prefix!r} is already registered")
    _NAMESPACES[prefix] = builder


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """Build a freshly initialised model (on the CPU, in train mode) from the registry.

    Args:
        arch: a name from :func:`list_models`, or ``"<namespace>:<name>"`` (e.g. ``"torchvision:resnet50"``).
        num_classes: number of output logits (>= 2).
        in_channels: image channels.
        image_size: side of the square input images.
        mean: per-channel mean of the training pixels in [0, 1]; ``None`` for 0.
        std: per-channel std of the training pixels in [0, 1]; ``None`` for 1.

    Returns:
        The model; move it with ``.to(device)``.

    Raises:
        InvalidInputError: unknown arch (the message lists the valid ones) or bad shape arguments.
    """
    prefix, sep, name = arch.partition(":")
    builder: Callable[..., Classifier] | None = _REGISTRY.get(arch)
    if sep and prefix in _NAMESPACES:
        builder = functools.partial(_NAMESPACES[prefix], name)
    if builder is None:
        spaces = "".join(f", {p}:<name>" for p in sorted(_NAMESPACES))
        raise InvalidInputError(f"unknown model architecture {arch!r}; valid: {', '.join(list_models())}{spaces}")
    _check_shape_args(num_classes, in_channels, image_size)
    model = builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, mean=mean, std=std)
    if not isinstance(model, Classifier):
        raise InvalidInputError(f"builder of {arch!r} returned {type(model).__name__}, not a Classifier")
    model.arch = arch
    logger.debug("built model arch=%s classes=%d params=%d", arch, num_classes, count_parameters(model))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
