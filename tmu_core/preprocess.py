"""How a raw image becomes a model's input: one function, used everywhere an image meets a model.

A model version records its :class:`Preprocess` in its checkpoint metadata (``meta.preprocess``) and so in its
archive: the training index applies it when it reads samples for training, unlearning and evaluation, the ONNX
export check uses it, and the TorchServe handler applies it to every photo a client sends. The steps, in order:
EXIF orientation, conversion to the model's channels (RGB or L), resize of the shorter side to ``resize`` with
``interpolation``, centre crop to ``size`` x ``size``. The result is a uint8 tensor (C, size, size);
normalisation (mean/std) happens inside the model, whose buffers hold it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from tmu_core.errors import InvalidInputError

INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocess:
    """A model version's input preprocessing.

    Attributes:
        size: side of the square input the model takes, in pixels.
        resize: the shorter side is resized to this before the centre crop (None: to ``size``).
        channels: 3 (RGB) or 1 (greyscale).
        interpolation: ``nearest``, ``bilinear`` or ``bicubic``.
    """

    size: int
    resize: int | None = None
    channels: int = 3
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise InvalidInputError(f"preprocess size must be a positive int, got {self.size!r}")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < self.size):
            raise InvalidInputError(f"preprocess resize must be an int >= size ({self.size}), got {self.resize!r}")
        if self.channels not in (1, 3):
            raise InvalidInputError(f"preprocess channels must be 1 or 3, got {self.channels!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise InvalidInputError(f"preprocess interpolation must be one of {sorted(INTERPOLATIONS)}, "
                                    f"got {self.interpolation!r}")

    @classmethod
    def from_meta(cls, meta: Any) -> "Preprocess":
        """The preprocessing a checkpoint records, or ``image_size`` square for one that records none."""
        get = meta.get if isinstance(meta, dict) else lambda name: getattr(meta, name, None)
        recorded = get("preprocess")
        if recorded:
            return cls.from_dict(recorded)
        return cls(size=int(get("image_size")), channels=int(get("in_channels")))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict`.

        Raises:
            InvalidInputError: unknown keys or invalid values.
        """
        known = {"size", "resize", "channels", "interpolation"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown preprocess keys {unknown}; accepted: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (stored in checkpoint metadata)."""
        return asdict(self)

    def apply(self, image: Image.Image) -> torch.Tensor:
        """A decoded image -> uint8 tensor (C, size, size), by the steps in the module docstring."""
        image = to_8bit(ImageOps.exif_transpose(image))
        image = image.convert("RGB" if self.channels == 3 else "L")
        image = _resize_shorter(image, self.resize or self.size, INTERPOLATIONS[self.interpolation])
        image = _centre_crop(image, self.size)
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())  # (C, H, W), writable


def to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale (``I;16*``, ``I``) -> ``L`` by scaling 0..65535 to 0..255; other modes as they are.

    PIL's own ``convert("L")`` clips such images at 255 instead of scaling them, turning most photos white.
    """
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    wide = np.asarray(image).astype(np.float64)  # (H, W)
    return Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))


def _resize_shorter(image: Image.Image, side: int, method: Image.Resampling) -> Image.Image:
    width, height = image.size
    if min(width, height) == side:
        return image
    scale = side / min(width, height)
    size = (max(side, round(width * scale)), max(side, round(height * scale)))
    return image.resize(size, method)


def _centre_crop(image: Image.Image, side: int) -> Image.Image:
    width, height = image.size
    if (width, height) == (side, side):
        return image
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))
