"""Builders shared by the index tests: tiny ImageFolder trees written with Pillow (no tests here)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["cat", "dog", "eel"]
SIZE = 8


def image_bytes(pixels: np.ndarray, fmt: str) -> bytes:
    """Encode an (H, W, 3) or (H, W) uint8 array as PNG or JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def random_pixels(seed: int, channels: int = 3, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size, size, channels) if channels > 1 else (size, size)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def make_tree(root: Path, train: int = 4, test: int = 2, fmt: str = "PNG") -> dict[str, np.ndarray]:
    """Write root/{train,test}/<class>/NNNN.<ext> with random pixels; returns sample id -> (H, W, C) pixels."""
    ext = "png" if fmt == "PNG" else "jpg"
    written: dict[str, np.ndarray] = {}
    seed = 0
    for split, count in (("train", train), ("test", test)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                pixels = random_pixels(seed)
                seed += 1
                (folder / f"{n:04d}.{ext}").write_bytes(image_bytes(pixels, fmt))
                written[f"{split}/{name}/{n:04d}"] = pixels
    return written


def zip_tree(root: Path, zip_path: Path, prefix: str = "") -> Path:
    """Zip the files under ``root`` (stored, like the CIFAR-10 zip), optionally under a top folder."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(root).as_posix())
    return zip_path
