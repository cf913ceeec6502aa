"""Image bytes in and out of the index: what is stored, the pixels it decodes to, and their hash.

JPEG and PNG bytes are kept exactly as they arrived. WebP, BMP, GIF (first frame) and TIFF arrive as any
other photo does, but are stored as a lossless PNG of their pixels after EXIF orientation, so the index holds
two codecs only. Digits are stored as raw pixel bytes.

Every stored image decodes to *canonical pixels*: uint8 (C, H, W), greyscale (C = 1) or RGB (C = 3), of the
image's own size. Palette and 1-bit images convert losslessly; alpha is dropped, CMYK becomes RGB and 16-bit
greyscale is scaled to 8 bits, as :class:`tmu_core.preprocess.Preprocess` does for a model. The pixel hash is
taken over the canonical pixels. A model never reads canonical pixels directly: reads for a model go through
its ``Preprocess`` (:func:`preprocessed`).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tmu_core.errors import InvalidInputError
from tmu_core.preprocess import Preprocess, to_8bit

CODECS = ("jpeg", "png", "raw")
_KEPT = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png"}  # MPO: a JPEG with extra frames, as phones write
_REENCODED = ("WEBP", "BMP", "GIF", "TIFF")
ACCEPTED = "JPEG, PNG, WebP, BMP, GIF or TIFF"
_GREY = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def pixel_hash(pixels: np.ndarray) -> str:
    """sha256 hex of the C-contiguous uint8 (C, H, W) pixel bytes."""
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def _canonical(image: Image.Image) -> np.ndarray:
    """uint8 (C, H, W): greyscale modes -> L, everything else -> RGB (palette with transparency included)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = to_8bit(image.convert("I") if image.mode == "F" else image)
    target = "L" if image.mode in _GREY else "RGB"
    if image.mode != target:
        image = image.convert(target)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        return array[None, :, :].copy()
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _open(data: bytes, name: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Image.DecompressionBombError as err:
        raise InvalidInputError(f"{name}: refused as a decompression bomb ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        why = "" if isinstance(err, UnidentifiedImageError) else f": {err}"  # PIL's text names only the buffer
        raise InvalidInputError(
            f"{name}: not a readable image ({len(data)} bytes starting {data[:8]!r}){why}; expected {ACCEPTED}"
        ) from err


def encode_for_index(data: bytes, name: str) -> tuple[str, bytes, np.ndarray]:
    """Check image bytes and decide what the index stores.

    Args:
        data: the encoded file bytes.
        name: the file name, used in error messages.

    Returns:
        ``(codec, stored bytes, canonical pixels)``: JPEG and PNG bytes as they are; other formats as a PNG.

    Raises:
        InvalidInputError: the bytes are not a readable image of an accepted format, or a decompression bomb.
    """
    with _open(data, name) as image:
        fmt = image.format or "unknown"
        if fmt in _KEPT:
            return _KEPT[fmt], data, _canonical(image)
        if fmt not in _REENCODED:
            raise InvalidInputError(f"{name}: {fmt} images are not accepted; expected {ACCEPTED}")
        pixels = _canonical(ImageOps.exif_transpose(image))
    buf = io.BytesIO()
    Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).save(buf, "PNG")
    return "png", buf.getvalue(), pixels


def decode_encoded(data: bytes, name: str) -> tuple[str, np.ndarray]:
    """Decode stored JPEG or PNG bytes to ``(codec, canonical pixels)``.

    Raises:
        InvalidInputError: the bytes are not a readable JPEG or PNG.
    """
    with _open(data, name) as image:
        codec = _KEPT.get(image.format or "")
        if codec is None:
            raise InvalidInputError(f"{name}: expected JPEG or PNG bytes, got {image.format or 'unknown'} format")
        return codec, _canonical(image)


def _check_codec(codec: str, name: str) -> None:
    if codec not in CODECS:
        raise InvalidInputError(f"{name}: unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def _raw(data: bytes, shape: tuple[int, int, int] | None, name: str) -> np.ndarray:
    if shape is None:
        raise InvalidInputError(f"{name}: raw pixels need the index's one image shape, and this index has none")
    expected = shape[0] * shape[1] * shape[2]
    if len(data) != expected:
        raise InvalidInputError(f"{name}: raw pixels hold {len(data)} bytes, expected {expected} for {shape}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def decode_stored(codec: str, data: bytes, shape: tuple[int, int, int] | None, name: str) -> np.ndarray:
    """Decode bytes read back from the blob file into canonical uint8 (C, H, W) pixels.

    Args:
        shape: the index's one image shape, checked; None for an index of mixed sizes.

    Raises:
        InvalidInputError: the bytes do not decode, or decode to another shape than ``shape``.
    """
    _check_codec(codec, name)
    if codec == "raw":
        return _raw(data, shape, name)
    _, pixels = decode_encoded(data, name)
    if shape is not None and tuple(pixels.shape) != tuple(shape):
        raise InvalidInputError(f"{name}: decodes to shape {tuple(pixels.shape)}, the index holds {tuple(shape)}")
    return pixels


def preprocessed(codec: str, data: bytes, shape: tuple[int, int, int] | None, preprocess: Preprocess,
                 name: str) -> torch.Tensor:
    """Stored bytes -> a model's input, uint8 (C, size, size), by ``preprocess`` (the handler's one function).

    Raises:
        InvalidInputError: the bytes do not decode.
    """
    _check_codec(codec, name)
    if codec == "raw":
        pixels = _raw(data, shape, name)
        image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
        return preprocess.apply(image)
    with _open(data, name) as image:
        return preprocess.apply(image)
