"""Training index: ingest, look-ups, loading and info on tiny synthetic trees and the bundled digits."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from test_index_support import CLASSES, SIZE, make_tree, zip_tree

from tmu_core.errors import CheckpointError, InvalidInputError, UnknownIdsError
from tmu_core.index import (
    IndexInfo,
    SampleRecord,
    TrainingIndex,
    ingest_digits,
    ingest_image_folder,
    ingest_zip,
)


@pytest.fixture
def png_tree(tmp_path):
    pixels = make_tree(tmp_path / "src")
    return tmp_path / "src", pixels


def test_ids_are_sorted_per_split_and_class(png_tree, tmp_path):
    root, pixels = png_tree
    idx = ingest_image_folder(root, tmp_path / "index")
    assert idx.classes == CLASSES
    assert idx.image_shape == (3, SIZE, SIZE)
    assert idx.ids("train") == sorted(k for k in pixels if k.startswith("train/"))
    assert idx.ids("test") == sorted(k for k in pixels if k.startswith("test/"))
    assert idx.retained_ids() == idx.ids("train")
    assert idx.ids("train", classes=[1]) == [f"train/dog/{n:04d}" for n in range(4)]
    assert idx.ids("test", classes=[0, 2]) == ["test/cat/0000", "test/cat/0001", "test/eel/0000", "test/eel/0001"]


def test_png_pixels_round_trip_exactly(png_tree, tmp_path):
    root, pixels = png_tree
    idx = ingest_image_folder(root, tmp_path / "index")
    ids = ["train/eel/0003", "test/cat/0000", "train/cat/0001"]
    images = idx.load(ids)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, SIZE, SIZE)
    for row, sample_id in enumerate(ids):
        expected = torch.from_numpy(pixels[sample_id]).permute(2, 0, 1)
        assert torch.equal(images[row], expected)
    assert idx.labels(ids).tolist() == [2, 0, 0]
    assert idx.labels(ids).dtype == torch.long


def test_lookup_records_hash_of_decoded_pixels(png_tree, tmp_path):
    root, pixels = png_tree
    idx = ingest_image_folder(root, tmp_path / "index")
    [record] = idx.lookup(["train/dog/0002"])
    chw = np.ascontiguousarray(pixels["train/dog/0002"].transpose(2, 0, 1))
    assert record == SampleRecord("train/dog/0002", "train/dog/0002", 1, "train",
                                  hashlib.sha256(chw.tobytes()).hexdigest(), "png", record.offset, record.length)
    assert record.length == len((root / "train/dog/0002.png").read_bytes())


def test_jpeg_bytes_kept_as_they_are(tmp_path):
    make_tree(tmp_path / "src", train=2, test=1, fmt="JPEG")
    idx = ingest_image_folder(tmp_path / "src", tmp_path / "index")
    blobs = (tmp_path / "index" / "blobs.bin").read_bytes()
    for record in idx.lookup(idx.ids("train") + idx.ids("test")):
        original = (tmp_path / "src" / f"{record.sample_id}.jpg").read_bytes()
        assert record.codec == "jpeg"
        assert blobs[record.offset:record.offset + record.length] == original


def test_palette_png_is_expanded_to_rgb_losslessly(tmp_path):
    from PIL import Image

    make_tree(tmp_path / "src", train=1, test=1)
    rgb = Image.fromarray(np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8, 1), 3, axis=2) * 3)
    palette = rgb.quantize(colors=256)
    palette.save(tmp_path / "src" / "train" / "dog" / "0001.png")
    idx = ingest_image_folder(tmp_path / "src", tmp_path / "index")
    expected = torch.from_numpy(np.array(palette.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(idx.load(["train/dog/0001"])[0], expected)


def test_iter_batches_matches_load(png_tree, tmp_path):
    root, _ = png_tree
    idx = ingest_image_folder(root, tmp_path / "index")
    ids = idx.ids("train")
    batches = list(idx.iter_batches(ids, batch_size=5))
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), idx.load(ids))
    assert torch.equal(torch.cat([b[1] for b in batches]), idx.labels(ids))


def test_subsets_take_first_files_of_each_class(png_tree, tmp_path):
    root, _ = png_tree
    idx = ingest_image_folder(root, tmp_path / "index", train_per_class=2, test_per_class=1)
    assert idx.ids("train") == [f"train/{c}/{n:04d}" for c in CLASSES for n in range(2)]
    assert idx.ids("test") == [f"test/{c}/0000" for c in CLASSES]


def test_zip_with_top_folder_matches_folder_ingest(png_tree, tmp_path):
    root, _ = png_tree
    archive = zip_tree(root, tmp_path / "data.zip", prefix="cifar/")
    from_zip = ingest_zip(archive, tmp_path / "zip-index", train_per_class=3)
    from_dir = ingest_image_folder(root, tmp_path / "dir-index", train_per_class=3)
    ids = from_zip.ids("train") + from_zip.ids("test")
    assert ids == from_dir.ids("train") + from_dir.ids("test")
    assert [r.content_hash for r in from_zip.lookup(ids)] == [r.content_hash for r in from_dir.lookup(ids)]


def test_owners_from_csv_and_json(png_tree, tmp_path):
    root, _ = png_tree
    csv_file = tmp_path / "owners.csv"
    csv_file.write_text("sample_id,owner_id\ntrain/cat/0000,alice\ntrain/dog/0001,alice\ntest/eel/0000,bob\n")
    idx = ingest_image_folder(root, tmp_path / "a", owners=csv_file)
    assert idx.ids_for_owners(["alice"]) == ["train/cat/0000", "train/dog/0001"]
    assert idx.ids_for_owners(["bob"]) == []
    assert idx.ids_for_owners(["bob"], split="test") == ["test/eel/0000"]
    assert idx.lookup(["train/cat/0001"])[0].owner_id == "train/cat/0001"
    json_file = tmp_path / "owners.json"
    json_file.write_text('{"train/eel/0003": "carol"}')
    idx2 = ingest_image_folder(root, tmp_path / "b", owners=json_file)
    assert idx2.ids_for_owners(["carol"]) == ["train/eel/0003"]
    with pytest.raises(UnknownIdsError) as err:
        idx2.ids_for_owners(["carol", "zed"])
    assert err.value.kind == "owner" and err.value.ids == ["zed"]


def test_digits_split_is_stratified_and_seeded(tmp_path):
    idx = ingest_digits(tmp_path / "d")
    info = idx.info()
    assert info.classes == [str(c) for c in range(10)] and info.image_shape == (1, 8, 8)
    assert info.counts["train"] + info.counts["test"] == 1797
    for name in info.classes:
        total = info.class_counts["train"][name] + info.class_counts["test"][name]
        assert info.class_counts["test"][name] == round(total * 0.2)
    same = ingest_digits(tmp_path / "e", seed=0)
    other = ingest_digits(tmp_path / "f", seed=1)
    assert same.ids("test") == idx.ids("test") and other.ids("test") != idx.ids("test")
    from sklearn.datasets import load_digits

    raw = load_digits().images[5]
    n_id = next(i for i in idx.ids("train") + idx.ids("test") if i.endswith("/5"))
    expected = torch.from_numpy(np.round(raw * 255 / 16).astype(np.uint8))
    assert torch.equal(idx.load([n_id])[0, 0], expected)


def test_info_counts_and_size(png_tree, tmp_path):
    root, _ = png_tree
    idx = ingest_image_folder(root, tmp_path / "index")
    info = idx.info()
    assert isinstance(info, IndexInfo)
    assert info.counts == {"train": 12, "test": 6}
    assert info.class_counts["train"] == {"cat": 4, "dog": 4, "eel": 4}
    assert info.owners == 18 and info.tombstones == 0
    on_disk = sum(p.stat().st_size for p in (tmp_path / "index").iterdir())
    assert info.size_bytes == on_disk


def test_fingerprint_is_sha256_of_sorted_ids(png_tree, tmp_path):
    root, _ = png_tree
    idx = ingest_image_folder(root, tmp_path / "index")
    expected = hashlib.sha256(b"train/cat/0000\ntrain/dog/0000").hexdigest()
    assert idx.fingerprint(["train/dog/0000", "train/cat/0000"]) == expected


def test_lookup_lists_unknown_ids(png_tree, tmp_path):
    root, _ = png_tree
    idx = ingest_image_folder(root, tmp_path / "index")
    with pytest.raises(UnknownIdsError, match="2 unknown sample id") as err:
        idx.load(["train/cat/0000", "train/cat/9999", "nope"])
    assert err.value.ids == ["nope", "train/cat/9999"]


def test_bad_arguments_name_what_is_accepted(png_tree, tmp_path):
    root, _ = png_tree
    idx = ingest_image_folder(root, tmp_path / "index")
    with pytest.raises(InvalidInputError, match="unknown split 'val'; expected one of train, test"):
        idx.ids("val")
    with pytest.raises(InvalidInputError, match=r"class index\(es\) 3 out of range; expected 0..2"):
        idx.ids("train", classes=[0, 3])
    with pytest.raises(InvalidInputError, match="batch_size must be a positive int, got 0"):
        idx.iter_batches(idx.ids("train"), 0)


def test_open_rejects_what_is_not_an_index(tmp_path):
    with pytest.raises(CheckpointError, match="index.sqlite is missing"):
        TrainingIndex.open(tmp_path)
    (tmp_path / "index.sqlite").write_bytes(b"not a database at all" * 10)
    (tmp_path / "blobs.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a training index"):
        TrainingIndex.open(tmp_path)
