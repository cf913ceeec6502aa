"""Turn one inference request's payload into an image tensor, exactly as the model saw images in training.

Accepted payloads, one image per request (TorchServe batches requests on the server side):

* raw JPEG or PNG bytes as the body;
* a JSON object ``{"image": "<base64 JPEG or PNG>"}`` (a ``data:image/...;base64,`` prefix is allowed);
* pixel values as nested JSON lists, either as the whole body or as ``{"image": [...]}``: shape (C, H, W) or
  (H, W, C), or (H, W) for single-channel models; all ints in 0..255, or floats in [0, 1]. When both
  layouts fit (H == W == C), (C, H, W) wins.

Size and channel count must equal the checkpoint's ``image_size`` and ``in_channels``: nothing is resized or
converted, because the model only ever saw images of that shape. Every failure raises ``InvalidInputError``
with a message naming the item, what arrived and what is accepted.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tmu_core.errors import InvalidInputError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MODE_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3}
_ACCEPTED = ("JPEG or PNG bytes, JSON {\"image\": \"<base64 JPEG/PNG>\"}, "
             "or JSON nested lists of pixels (C,H,W or H,W,C; ints 0..255 or floats in [0,1])")


@dataclass(frozen=True)
class ImageSpec:
    """The input an archive's model expects.

    Attributes:
        in_channels: image channels (3 for RGB, 1 for greyscale).
        image_size: side of the square images, in pixels.
        max_bytes: largest accepted payload, in bytes.
    """

    in_channels: int
    image_size: int
    max_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise InvalidInputError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.image_size < 1:
            raise InvalidInputError(f"image_size must be >= 1, got {self.image_size}")
        if self.max_bytes < 1:
            raise InvalidInputError(f"max_bytes must be >= 1, got {self.max_bytes}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return (self.in_channels, self.image_size, self.image_size)


def request_payload(item: Any, where: str = "image") -> Any:
    """The payload of one TorchServe request: ``body``, else ``data``, else a multipart form's only field.

    Raises:
        InvalidInputError: a multipart form with several fields and none named ``data`` or ``body``.
    """
    if not isinstance(item, dict):
        return item
    for key in ("body", "data"):
        if key in item:
            return item[key]
    if len(item) == 1:
        return next(iter(item.values()))
    if not item:
        return None
    raise InvalidInputError(f"{where}: form fields {sorted(map(str, item))}; send the image as the body, "
                            "as the form field 'data', or as the only form field")


def decode_payload(payload: Any, spec: ImageSpec, where: str) -> torch.Tensor:
    """Decode one payload into a float image in [0, 1] of shape (C, H, W) on the CPU.

    Args:
        payload: bytes, text, or an already-parsed JSON value, as TorchServe hands it over.
        spec: the shape the model expects and the payload size limit.
        where: the item's name in messages, e.g. ``"image 2 of 4"``.

    Returns:
        A float32 tensor (C, H, W) with values in [0, 1].

    Raises:
        InvalidInputError: the payload is empty, too big, not an image, or has the wrong shape or values.
    """
    if payload is None or (isinstance(payload, (bytes, bytearray, str)) and len(payload) == 0):
        raise InvalidInputError(f"{where}: empty body; expected {_ACCEPTED}")
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray)):
        return _decode_bytes(bytes(payload), spec, where)
    if isinstance(payload, (dict, list)):
        # TorchServe already parsed an application/json body; measure it as it was sent.
        size = len(json.dumps(payload, separators=(",", ":")))
        _check_size(size, spec, where)
        return _decode_json(payload, spec, where)
    raise InvalidInputError(f"{where}: got a {type(payload).__name__}; expected {_ACCEPTED}")


def _check_size(size: int, spec: ImageSpec, where: str) -> None:
    if size > spec.max_bytes:
        raise InvalidInputError(f"{where}: payload of {size} bytes is over the limit of {spec.max_bytes} bytes")


def _decode_bytes(data: bytes, spec: ImageSpec, where: str) -> torch.Tensor:
    _check_size(len(data), spec, where)
    if data.startswith(JPEG_MAGIC) or data.startswith(PNG_MAGIC):
        return _decode_image(data, spec, where)
    if data.lstrip()[:1] in (b"{", b"["):
        try:
            parsed = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidInputError(f"{where}: bad JSON ({err}); expected {_ACCEPTED}") from err
        return _decode_json(parsed, spec, where)
    raise InvalidInputError(f"{where}: expected {_ACCEPTED}; got {len(data)} bytes starting {data[:8]!r}")


def _decode_json(value: Any, spec: ImageSpec, where: str) -> torch.Tensor:
    if isinstance(value, list):
        return pixels_to_tensor(value, spec, where)
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where}: got JSON {type(value).__name__}; expected {_ACCEPTED}")
    if "image" not in value:
        hint = " (send one image per request; TorchServe batches requests)" if "instances" in value else ""
        raise InvalidInputError(
            f"{where}: JSON object needs the key 'image' (base64 JPEG/PNG string or nested pixel lists), "
            f"got keys {sorted(map(str, value))}{hint}")
    image = value["image"]
    if isinstance(image, list):
        return pixels_to_tensor(image, spec, where)
    if not isinstance(image, str):
        raise InvalidInputError(
            f"{where}: 'image' must be a base64 string or nested pixel lists, got {type(image).__name__}")
    return _decode_image(_b64decode(image, where), spec, where)


def _b64decode(text: str, where: str) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInputError(
            f"{where}: 'image' is not valid base64 ({err}); got {len(text)} characters starting {text[:12]!r}"
        ) from err
    if not (data.startswith(JPEG_MAGIC) or data.startswith(PNG_MAGIC)):
        raise InvalidInputError(
            f"{where}: base64 'image' must hold JPEG or PNG bytes, got {len(data)} bytes starting {data[:8]!r}")
    return data


def _decode_image(data: bytes, spec: ImageSpec, where: str) -> torch.Tensor:
    try:
        img = Image.open(io.BytesIO(data))
        # The header gives the size: check it before decoding any pixels.
        if img.size != (spec.image_size, spec.image_size):
            raise InvalidInputError(
                f"{where}: {img.format} image is {img.size[0]}x{img.size[1]}, "
                f"the model accepts {spec.image_size}x{spec.image_size} only")
        if img.mode in ("P", "1"):
            img = img.convert("RGB" if img.mode == "P" else "L")
        channels = _MODE_CHANNELS.get(img.mode)
        if channels != spec.in_channels:
            raise InvalidInputError(
                f"{where}: {img.format} image has mode {img.mode} ({channels or 'unsupported'} channels), "
                f"the model accepts {spec.in_channels}-channel {'RGB' if spec.in_channels == 3 else 'L'} images")
        pixels = np.asarray(img, dtype=np.uint8)
    except InvalidInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InvalidInputError(f"{where}: corrupt or unreadable image ({err}); expected {_ACCEPTED}") from err
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)  # (C, H, W)


def pixels_to_tensor(value: list, spec: ImageSpec, where: str) -> torch.Tensor:
    """Nested pixel lists -> float32 (C, H, W) in [0, 1]; see the module docstring for the accepted forms.

    Raises:
        InvalidInputError: ragged lists, non-numbers, values out of range or a shape the model does not take.
    """
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise InvalidInputError(f"{where}: pixel lists are ragged or not numbers ({err})") from err
    if arr.dtype.kind not in "iuf":
        raise InvalidInputError(
            f"{where}: pixel lists must hold numbers only (ints 0..255 or floats in [0,1]), got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
            raise InvalidInputError(f"{where}: float pixels must be finite and in [0, 1], "
                                    f"got range [{arr.min()}, {arr.max()}]")
        chw = _to_chw(arr.astype(np.float32), spec, where)
        return torch.from_numpy(np.ascontiguousarray(chw))
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise InvalidInputError(f"{where}: int pixels must be in 0..255, got range [{arr.min()}, {arr.max()}]")
    chw = _to_chw(arr.astype(np.uint8), spec, where)
    return torch.from_numpy(np.ascontiguousarray(chw)).float().div_(255.0)


def _to_chw(arr: np.ndarray, spec: ImageSpec, where: str) -> np.ndarray:
    c, s = spec.in_channels, spec.image_size
    if arr.shape == (c, s, s):
        return arr
    if arr.shape == (s, s, c):
        return arr.transpose(2, 0, 1)
    if c == 1 and arr.shape == (s, s):
        return arr[None]
    accepted = f"({c}, {s}, {s}) or ({s}, {s}, {c})" + (f" or ({s}, {s})" if c == 1 else "")
    raise InvalidInputError(f"{where}: pixel lists have shape {tuple(arr.shape)}, the model accepts {accepted}")
