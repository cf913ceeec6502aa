"""The handler on real photos: any size, format and mode, through the version's Preprocess, in process."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handler.tmu_handler import TmuHandler
from tmu_core.models import build_model
from tmu_core.preprocess import Preprocess
from tmu_core.serving.export import export_onnx
from tmu_core.train import CheckpointMeta, load_checkpoint, save_checkpoint

CLASSES = ("ant", "bee", "cat", "dog")
PRE = Preprocess(size=16, resize=18)


class FakeContext:
    def __init__(self, model_dir: Path, yaml_config: dict) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 8}
        self.manifest = {"model": {"modelName": "tiny", "modelVersion": "1"}}
        self.model_yaml_config = yaml_config
        self.metrics = None
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    torch.manual_seed(0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = build_model("small_cnn", len(CLASSES), 3, PRE.size, mean, std)
    meta = CheckpointMeta("small_cnn", len(CLASSES), CLASSES, 3, PRE.size, mean, std, 0, {}, "fp", 10,
                          preprocess=PRE.to_dict())
    save_checkpoint(folder / "checkpoint.pt", model, meta)
    (folder / "meta.json").write_text(json.dumps(meta.to_dict()))
    export_onnx(model.eval(), meta, folder / "model.onnx")
    return folder


def _photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A smooth image with structure (so resizing matters) and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=2)
    noise = rng.integers(0, 40, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _save(_photo(320, 200, 3), "JPEG", exif=exif.tobytes())


def _i16_png() -> bytes:
    wide = (np.asarray(_photo(120, 90, 4).convert("L"), dtype=np.uint16) * 257)
    return _save(Image.fromarray(wide), "PNG")


PHOTOS = {
    "640x480 JPEG": lambda: _save(_photo(), "JPEG", quality=90),
    "RGBA PNG": lambda: _save(_photo(200, 150, 1).convert("RGBA"), "PNG"),
    "greyscale PNG": lambda: _save(_photo(100, 300, 2).convert("L"), "PNG"),
    "LA PNG": lambda: _save(_photo(64, 48, 2).convert("LA"), "PNG"),
    "EXIF-rotated JPEG": _exif_rotated,
    "CMYK JPEG": lambda: _save(_photo(90, 60, 5).convert("CMYK"), "JPEG"),
    "P-mode GIF": lambda: _save(_photo(80, 80, 6).convert("P"), "GIF"),
    "WebP": lambda: _save(_photo(150, 100, 7), "WEBP"),
    "TIFF": lambda: _save(_photo(70, 50, 8), "TIFF"),
    "BMP": lambda: _save(_photo(33, 41, 9), "BMP"),
    "I;16 PNG": _i16_png,
}


def _handler(model_dir: Path, backend: str = "onnx", **settings) -> tuple[TmuHandler, FakeContext]:
    ctx = FakeContext(model_dir, {"handler": {"backend": backend, **settings}})
    handler = TmuHandler()
    handler.initialize(ctx)
    return handler, ctx


def _expected_top1(model_dir: Path, data: bytes) -> int:
    model, meta = load_checkpoint(model_dir / "checkpoint.pt", "cpu")
    pixels = Preprocess.from_meta(meta).apply(Image.open(io.BytesIO(data)))  # uint8 (C, 16, 16)
    with torch.inference_mode():
        return int(model(pixels[None].float() / 255).argmax(dim=1))


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_each_photo_kind_matches_the_model_on_the_preprocessed_tensor(model_dir, name, backend):
    data = PHOTOS[name]()
    handler, ctx = _handler(model_dir, backend)
    out = handler.handle([{"body": data}], ctx)
    assert ctx.statuses == {} and len(out) == 1
    assert out[0]["predictions"][0]["index"] == _expected_top1(model_dir, data)


def test_i16_is_scaled_to_8_bits_not_clipped():
    wide = np.full((4, 4), 32896, dtype=np.uint16)  # 128 * 257
    pixels = Preprocess(size=4, channels=1).apply(Image.fromarray(wide))
    assert pixels.shape == (1, 4, 4) and int(pixels.max()) == 128


def test_exif_orientation_is_honoured():
    pixels = Preprocess(size=16, resize=16).apply(Image.open(io.BytesIO(_exif_rotated())))
    upright = Preprocess(size=16, resize=16).apply(_photo(320, 200, 3).transpose(Image.Transpose.ROTATE_270))
    assert (pixels.float() - upright.float()).abs().mean() < 8  # JPEG noise only


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def test_a_bomb_and_a_truncated_file_get_their_own_400_in_a_batch_of_three(model_dir):
    good = PHOTOS["640x480 JPEG"]()
    truncated = good[: len(good) // 3]
    handler, ctx = _handler(model_dir)
    out = handler.handle([{"body": _bomb_png()}, {"body": good}, {"body": truncated}], ctx)
    assert len(out) == 3 and sorted(ctx.statuses) == [0, 2]
    assert ctx.statuses[0] == (400, "Bad Request")
    assert out[0]["error"].startswith("image 1 of 3: image refused as a decompression bomb (Image size "
                                      "(900000000 pixels) exceeds limit")
    assert ctx.statuses[2][0] == 400 and out[2]["error"].startswith("image 3 of 3: corrupt or unreadable image")
    assert out[1]["predictions"][0]["index"] == _expected_top1(model_dir, good)


def test_max_pixels_is_checked_from_the_header_before_decoding(model_dir):
    handler, ctx = _handler(model_dir)
    out = handler.handle([{"body": _bomb_png(8000, 6000)}], ctx)
    assert ctx.statuses[0] == (400, "Bad Request")
    assert out[0]["error"] == ("image 1 of 1: PNG image of 8000x6000 = 48000000 pixels is over the limit of "
                                    "40000000 pixels")


def test_several_images_in_one_request_get_one_entry_each(model_dir):
    photos = [PHOTOS[n]() for n in ("640x480 JPEG", "RGBA PNG", "CMYK JPEG")]
    texts = [base64.b64encode(p).decode() for p in photos]
    handler, ctx = _handler(model_dir)
    bad = base64.b64encode(b"nope").decode()
    out = handler.handle([{"body": json.dumps(texts).encode()}, {"body": {"images": [texts[0], bad]}},
                          {"body": photos[1]}], ctx)
    assert ctx.statuses == {} and len(out) == 3
    assert [a["predictions"][0]["index"] for a in out[0]] == [_expected_top1(model_dir, p) for p in photos]
    assert out[1][0] == out[0][0] and out[1][1]["error"].startswith("image 2 of 3, image 2 of 2: expected image")
    assert out[2]["predictions"] == out[0][1]["predictions"]


def test_a_request_of_only_bad_images_is_a_400(model_dir):
    handler, ctx = _handler(model_dir)
    out = handler.handle([{"body": {"images": ["@@"]}}], ctx)
    assert ctx.statuses[0][0] == 400 and out[0]["error"].startswith("every image was refused: image 1 of 1")


def test_too_many_images_and_too_many_bytes(model_dir):
    handler, ctx = _handler(model_dir, max_images=2, max_bytes=1000)
    text = base64.b64encode(PHOTOS["BMP"]()).decode()
    out = handler.handle([{"body": {"images": [text] * 3}}, {"body": PHOTOS["640x480 JPEG"]()}], ctx)
    assert out[0]["error"] == "image 1 of 2: 3 images in one request, the limit is 2"
    assert "is over the limit of 1000 bytes" in out[1]["error"]
