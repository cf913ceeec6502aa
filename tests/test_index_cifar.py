"""The whole CIFAR-10 JPEG zip ingested into an index (slow: skipped by default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmu_core.index import ingest_zip

CIFAR_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.zip"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.slow
def test_whole_cifar10_zip(tmp_path):
    if not CIFAR_ZIP.is_file():
        pytest.skip(f"{CIFAR_ZIP} is not present")
    index = ingest_zip(CIFAR_ZIP, tmp_path / "index")
    info = index.info()
    assert info.classes == CLASSES and info.image_shape == (3, 32, 32)
    assert info.counts == {"train": 50_000, "test": 10_000}
    assert all(n == 5_000 for n in info.class_counts["train"].values())
    assert all(n == 1_000 for n in info.class_counts["test"].values())
    assert info.size_bytes < 2 * CIFAR_ZIP.stat().st_size
    assert index.load(["train/cat/0000", "test/truck/0999"]).shape == (2, 3, 32, 32)
    forget = index.ids("train", classes=[3])[:100]
    assert index.forget(forget, "cifar-cat-100").forgotten == forget
    report = index.verify()
    assert report.ok and report.checked == 60_000
