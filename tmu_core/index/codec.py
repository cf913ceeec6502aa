"""Decode stored image bytes into uint8 (C, H, W) pixels, and hash pixels.

JPEG and PNG bytes are kept exactly as they arrived; digits are stored as raw pixel bytes.
Only lossless mode changes are made on decode (palette -> RGB, 1-bit -> L), so a stored image
always decodes to the same pixels.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from tmu_core.errors import InvalidInputError

CODECS = ("jpeg", "png", "raw")
_FORMATS = {"JPEG": "jpeg", "PNG": "png"}
# Modes that map to a channel count without losing information.
_LOSSLESS = {"L": "L", "1": "L", "RGB": "RGB", "P": "RGB"}


def pixel_hash(pixels: np.ndarray) -> str:
    """sha256 hex of the C-contiguous uint8 (C, H, W) pixel bytes."""
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def _to_chw(image: Image.Image, name: str) -> np.ndarray:
    target = _LOSSLESS.get(image.mode)
    if target is None:
        raise InvalidInputError(
            f"{name}: image mode {image.mode!r} is not accepted; expected grayscale (L) or RGB "
            "(palette and 1-bit images are converted); images with alpha or 16-bit depth are rejected"
        )
    if image.mode != target:
        image = image.convert(target)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        return array[None, :, :].copy()
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def decode_encoded(data: bytes, name: str) -> tuple[str, np.ndarray]:
    """Decode JPEG or PNG bytes once, checking them.

    Args:
        data: the encoded file bytes.
        name: the file name, used in error messages.

    Returns:
        ``(codec, pixels)`` with pixels a uint8 array (C, H, W).

    Raises:
        InvalidInputError: the bytes are not a readable JPEG or PNG, or the mode is not accepted.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            codec = _FORMATS.get(image.format or "")
            if codec is None:
                raise InvalidInputError(
                    f"{name}: expected JPEG or PNG bytes, got {image.format or 'unknown'} format"
                )
            image.load()
            return codec, _to_chw(image, name)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, InvalidInputError):
            raise
        raise InvalidInputError(
            f"{name}: not a readable JPEG or PNG image ({len(data)} bytes starting {data[:8]!r}): {err}"
        ) from err


def decode_stored(codec: str, data: bytes, shape: tuple[int, int, int], name: str) -> np.ndarray:
    """Decode bytes read back from the blob file into uint8 (C, H, W) pixels.

    Raises:
        InvalidInputError: the bytes do not decode, or decode to another shape than ``shape``.
    """
    if codec == "raw":
        expected = shape[0] * shape[1] * shape[2]
        if len(data) != expected:
            raise InvalidInputError(f"{name}: raw pixels hold {len(data)} bytes, expected {expected} for {shape}")
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)
    if codec not in CODECS:
        raise InvalidInputError(f"{name}: unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    _, pixels = decode_encoded(data, name)
    if tuple(pixels.shape) != tuple(shape):
        raise InvalidInputError(f"{name}: decodes to shape {tuple(pixels.shape)}, the index holds {tuple(shape)}")
    return pixels
