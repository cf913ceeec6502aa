"""Turn one inference request's payload into model inputs, through the model version's :class:`Preprocess`.

Accepted payloads (TorchServe batches requests on the server side; one request may also carry several images):

* raw image bytes as the body: JPEG, PNG, WebP, BMP, GIF (first frame) or TIFF (first page), of any size and
  mode (RGB, L, LA, P, RGBA, CMYK, I;16, ...);
* a JSON object ``{"image": "<base64 image>"}`` (a ``data:image/...;base64,`` prefix is allowed);
* several images: a JSON list of base64 strings, or ``{"images": [...]}`` whose entries are base64 strings or
  nested pixel lists; answered with one entry per image;
* pixel values as nested JSON lists, as the whole body or as ``{"image": [...]}``: shape (C, H, W) or
  (H, W, C), or (H, W) for single-channel models, at the model's exact input size; all ints in 0..255, or
  floats in [0, 1]. When both layouts fit (H == W == C), (C, H, W) wins.

Encoded images go through ``Preprocess.apply`` (EXIF orientation, channels, shorter-side resize, centre crop),
the same function the training index applies. 16-bit images are scaled to 8 bits first. An image is refused only
when it cannot be decoded, when its bytes exceed ``max_bytes``, or when its header claims more than
``max_pixels`` pixels (checked before any pixel is decoded; PIL's decompression-bomb warning is an error too).
Every failure raises ``InvalidInputError`` with a message naming the item, what arrived and what is accepted.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tmu_core.errors import InvalidInputError
from tmu_core.preprocess import Preprocess

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
DEFAULT_MAX_PIXELS = 40_000_000  # 8000x5000: above any phone photo, 120 MB as RGB
_ACCEPTED = ("image bytes (JPEG, PNG, WebP, BMP, GIF, TIFF), JSON {\"image\": \"<base64 image>\"}, "
             "JSON {\"images\": [...]} or a JSON list of base64 images, "
             "or JSON nested lists of pixels (C,H,W or H,W,C; ints 0..255 or floats in [0,1])")


@dataclass(frozen=True)
class ImageSpec:
    """The input an archive's model expects and the limits on what a client may send.

    Attributes:
        preprocess: the model version's preprocessing (input size and channels come from it).
        max_bytes: largest accepted image (encoded bytes, or the JSON text of pixel lists), in bytes.
        max_pixels: largest accepted width * height, read from the image header before decoding.
        max_images: most images in one request.
    """

    preprocess: Preprocess
    max_bytes: int = 1 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 64

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_images"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def in_channels(self) -> int:
        """1 or 3."""
        return self.preprocess.channels

    @property
    def image_size(self) -> int:
        """Side of the square model input."""
        return self.preprocess.size

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return (self.in_channels, self.image_size, self.image_size)


@dataclass(frozen=True)
class DecodedRequest:
    """One request's images: ``images[i]`` is a float tensor (C, H, W) in [0, 1], or the
    ``InvalidInputError`` that refused it; ``multi`` when the request carried a list of images."""

    images: list[torch.Tensor | InvalidInputError]
    multi: bool


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


def decode_request(payload: Any, spec: ImageSpec, where: str) -> DecodedRequest:
    """Decode one request: one image, or a list of images each decoded (or refused) on its own.

    Raises:
        InvalidInputError: the request as a whole is unreadable (empty, bad JSON, too many images).
    """
    value = _parse(payload, spec, where)
    images = _image_list(value)
    if images is None:
        return DecodedRequest([_decode_value(value, spec, where)], multi=False)
    if not images:
        raise InvalidInputError(f"{where}: the list of images is empty; expected {_ACCEPTED}")
    if len(images) > spec.max_images:
        raise InvalidInputError(f"{where}: {len(images)} images in one request, the limit is {spec.max_images}")
    decoded: list[torch.Tensor | InvalidInputError] = []
    for n, entry in enumerate(images):
        try:
            decoded.append(_decode_value(entry, spec, f"{where}, image {n + 1} of {len(images)}", single=True))
        except InvalidInputError as err:
            decoded.append(err)
    return DecodedRequest(decoded, multi=True)


def decode_payload(payload: Any, spec: ImageSpec, where: str) -> torch.Tensor:
    """Decode a single-image payload into a float image in [0, 1] of shape (C, size, size) on the CPU.

    Raises:
        InvalidInputError: the payload is empty, too big, not an image, a list of images, or has bad pixels.
    """
    request = decode_request(payload, spec, where)
    if request.multi:
        raise InvalidInputError(f"{where}: expected one image, got a list of {len(request.images)}")
    image = request.images[0]
    if isinstance(image, InvalidInputError):
        raise image
    return image


def _parse(payload: Any, spec: ImageSpec, where: str) -> Any:
    """Bytes stay bytes unless they are JSON; parsed JSON is returned as is."""
    if payload is None or (isinstance(payload, (bytes, bytearray, str)) and len(payload) == 0):
        raise InvalidInputError(f"{where}: empty body; expected {_ACCEPTED}")
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray)):
        data = bytes(payload)
        if data.lstrip()[:1] not in (b"{", b"["):
            return data
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidInputError(f"{where}: bad JSON ({err}); expected {_ACCEPTED}") from err
    if isinstance(payload, (dict, list)):
        return payload
    raise InvalidInputError(f"{where}: got a {type(payload).__name__}; expected {_ACCEPTED}")


def _image_list(value: Any) -> list | None:
    """The entries of a multi-image request, or None for a single image."""
    if isinstance(value, dict) and "images" in value and "image" not in value:
        images = value["images"]
        return images if isinstance(images, list) else [images]
    if isinstance(value, list) and value and all(isinstance(v, (str, dict)) for v in value):
        return value
    return None


def _check_size(size: int, spec: ImageSpec, where: str) -> None:
    if size > spec.max_bytes:
        raise InvalidInputError(f"{where}: payload of {size} bytes is over the limit of {spec.max_bytes} bytes")


def _decode_value(value: Any, spec: ImageSpec, where: str, single: bool = False) -> torch.Tensor:
    if isinstance(value, bytes):
        _check_size(len(value), spec, where)
        return decode_image_bytes(value, spec, where)
    if isinstance(value, list):
        _check_size(len(json.dumps(value, separators=(",", ":"))), spec, where)
        return pixels_to_tensor(value, spec, where)
    if isinstance(value, str) and single:
        return _decode_b64(value, spec, where)
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where}: got JSON {type(value).__name__}; expected {_ACCEPTED}")
    if "image" not in value:
        hint = " (send {\"images\": [...]} for several)" if "instances" in value else ""
        raise InvalidInputError(
            f"{where}: JSON object needs the key 'image' (base64 image or nested pixel lists) or 'images', "
            f"got keys {sorted(map(str, value))}{hint}")
    image = value["image"]
    if isinstance(image, list):
        return _decode_value(image, spec, where)
    if not isinstance(image, str):
        raise InvalidInputError(
            f"{where}: 'image' must be a base64 string or nested pixel lists, got {type(image).__name__}")
    return _decode_b64(image, spec, where)


def _decode_b64(text: str, spec: ImageSpec, where: str) -> torch.Tensor:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    # base64 is 4/3 of the bytes: refuse an oversized image before decoding the text.
    _check_size(len(text) * 3 // 4, spec, where)
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInputError(
            f"{where}: 'image' is not valid base64 ({err}); got {len(text)} characters starting {text[:12]!r}"
        ) from err
    return decode_image_bytes(data, spec, where)


def open_image(data: bytes, max_pixels: int, where: str) -> Image.Image:
    """Open and fully decode image bytes, refusing a header that claims more than ``max_pixels`` pixels.

    Raises:
        InvalidInputError: not a readable image of an accepted format, too many pixels, or truncated.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise InvalidInputError(f"{where}: {image.format} images are not accepted; expected {_ACCEPTED}")
            width, height = image.size  # from the header: no pixel decoded yet
            if width * height > max_pixels:
                raise InvalidInputError(f"{where}: {image.format} image of {width}x{height} = {width * height} "
                                        f"pixels is over the limit of {max_pixels} pixels")
            image.load()
            return image
    except InvalidInputError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise InvalidInputError(f"{where}: image refused as a decompression bomb ({err})") from err
    except UnidentifiedImageError as err:
        raise InvalidInputError(f"{where}: expected {_ACCEPTED}; got {len(data)} bytes starting {data[:8]!r}") \
            from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise InvalidInputError(f"{where}: corrupt or unreadable image ({err}); expected {_ACCEPTED}; "
                                f"got {len(data)} bytes starting {data[:8]!r}") from err


def decode_image_bytes(data: bytes, spec: ImageSpec, where: str) -> torch.Tensor:
    """Encoded image bytes -> float (C, size, size) in [0, 1] through the spec's preprocessing.

    Raises:
        InvalidInputError: see :func:`open_image`.
    """
    image = open_image(data, spec.max_pixels, where)
    try:
        pixels = spec.preprocess.apply(image)  # uint8 (C, size, size)
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"{where}: {image.format} image in mode {image.mode} cannot be converted ({err})") \
            from err
    return pixels.float().div_(255.0)


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
    raise InvalidInputError(f"{where}: pixel lists have shape {tuple(arr.shape)}, the model accepts {accepted} "
                            "(pixel lists are not resized; send an encoded image for other sizes)")
