"""An index of real photos: mixed sizes, formats and modes, read through a model's Preprocess; ``index add``."""

from __future__ import annotations

import io
import os
import sqlite3

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_handler_photos import PHOTOS
from test_index_support import image_bytes, make_tree, random_pixels, zip_tree

from tmu_core.cli import cli
from tmu_core.errors import ConflictError, InvalidInputError
from tmu_core.index import TrainingIndex, add_images, ingest_image_folder
from tmu_core.index import append as append_steps
from tmu_core.index.codec import pixel_hash
from tmu_core.index.schema import BLOB_NAME, DB_NAME
from tmu_core.preprocess import Preprocess
from tmu_core.serving.decode import ImageSpec, decode_image_bytes

PRE = Preprocess(size=16, resize=20)
SUFFIX = {b"\xff\xd8": "jpg", b"\x89P": "png", b"GI": "gif", b"RI": "webp", b"II": "tif", b"MM": "tif", b"BM": "bmp"}


def _suffix(data: bytes) -> str:
    return SUFFIX[data[:2]]


@pytest.fixture
def photo_tree(tmp_path):
    """train/cat holds one file per photo kind; dog and test/ hold 8x8 PNGs."""
    root = tmp_path / "photos"
    make_tree(root, train=2, test=1)
    files = {}
    for n, (name, make) in enumerate(sorted(PHOTOS.items())):
        data = make()
        path = root / "train" / "cat" / f"photo{n:02d}.{_suffix(data)}"
        path.write_bytes(data)
        files[f"train/cat/photo{n:02d}"] = (name, data)
    return root, files


def test_a_tree_of_every_photo_kind_is_indexed_and_read_as_the_handler_reads_it(photo_tree, tmp_path):
    root, files = photo_tree
    with ingest_image_folder(root, tmp_path / "index") as index:
        assert index.image_shape is None and index.info().image_shape is None
        assert index.verify().ok
        ids = sorted(files)
        with pytest.raises(InvalidInputError, match="mixed sizes; read it through a model's preprocessing"):
            index.load(ids)
        images = index.view(PRE).load(ids)
        assert images.shape == (len(ids), 3, 16, 16) and images.dtype == torch.uint8
        spec = ImageSpec(PRE)
        for row, sample_id in enumerate(ids):
            name, data = files[sample_id]
            served = decode_image_bytes(data, spec, name)  # the handler's path for the same file
            assert torch.equal(images[row], (served * 255).round().to(torch.uint8)), name
        batches = list(index.view(PRE).iter_batches(ids, 4))
        assert torch.equal(torch.cat([b for b, _ in batches]), images)
        assert [len(b) for b, _ in batches] == [4, 4, 3]


def test_greyscale_model_reads_the_same_photos_with_one_channel(photo_tree, tmp_path):
    root, files = photo_tree
    with ingest_image_folder(root, tmp_path / "index") as index:
        grey = index.view(Preprocess(size=8, channels=1)).load(sorted(files))
    assert grey.shape == (len(files), 1, 8, 8)


def test_formats_other_than_jpeg_and_png_are_stored_as_png_of_their_pixels(photo_tree, tmp_path):
    root, files = photo_tree
    with ingest_image_folder(root, tmp_path / "index") as index:
        records = {r.sample_id: r for r in index.lookup(sorted(files))}
    for sample_id, (name, data) in files.items():
        kept = Image.open(io.BytesIO(data)).format in ("JPEG", "PNG")
        assert records[sample_id].codec == ("jpeg" if data[:2] == b"\xff\xd8" else "png"), name
        blob = (tmp_path / "index" / BLOB_NAME).read_bytes()[records[sample_id].offset:][:records[sample_id].length]
        assert (blob == data) == kept, name


def test_a_forgotten_rgba_photo_is_refused_by_pixels_on_rebuild(photo_tree, tmp_path):
    root, files = photo_tree
    rgba = next(sid for sid, (name, _) in files.items() if name == "RGBA PNG")
    with ingest_image_folder(root, tmp_path / "index") as index:
        index.forget([rgba], "r1")
    # The same pixels under a new name (and as RGB: the alpha channel is not part of the pixels) come back.
    name, data = files[rgba]
    copy = root / "train" / "cat" / "renamed.png"
    copy.write_bytes(image_bytes(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), "PNG"))
    with ingest_image_folder(root, tmp_path / "index", overwrite=True) as index:
        assert index.build_record().skipped_forgotten == 2
        assert "train/cat/renamed" not in index.ids() and rgba not in index.ids()


def _new_samples(root, seed: int = 100, size: int = 8, classes=("cat", "eel")) -> dict[str, np.ndarray]:
    written = {}
    for n, name in enumerate(classes):
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = random_pixels(seed + n, size=size)
        (folder / f"new{n}.png").write_bytes(image_bytes(pixels, "PNG"))
        written[f"train/{name}/new{n}"] = pixels
    return written


@pytest.fixture
def index_8px(tmp_path):
    make_tree(tmp_path / "src", train=2, test=1)
    index = ingest_image_folder(tmp_path / "src", tmp_path / "index")
    yield index
    index.close()


def test_index_add_appends_samples_with_owners(index_8px, tmp_path):
    before = set(index_8px.ids())
    new = _new_samples(tmp_path / "batch1")
    owners = tmp_path / "owners.csv"
    owners.write_text("sample_id,owner_id\ntrain/cat/new0,zoe\ntrain/eel/new1,zoe\n")
    result = add_images(index_8px, tmp_path / "batch1", owners=owners)
    assert result.stored == 2 and result.sample_ids == sorted(new) and result.image_shape == (3, 8, 8)
    assert set(index_8px.ids()) == before | set(new)
    assert index_8px.ids_for_owners(["zoe"]) == sorted(new)
    assert [index_8px.classes[r.label] for r in index_8px.lookup(sorted(new))] == ["cat", "eel"]
    got = index_8px.load(sorted(new)).numpy().transpose(0, 2, 3, 1)
    assert all(np.array_equal(got[i], new[sid]) for i, sid in enumerate(sorted(new)))
    assert index_8px.verify().ok
    # A larger photo makes the index mixed-size, also for a process that opens it afterwards.
    _new_samples(tmp_path / "batch2", seed=200, size=12, classes=("dog",))
    assert add_images(index_8px, tmp_path / "batch2").image_shape is None
    with TrainingIndex.open(index_8px.root) as again:
        assert again.image_shape is None and "train/dog/new0" in again.ids()
        assert again.view(Preprocess(size=8)).load(["train/dog/new0"]).shape == (1, 3, 8, 8)


def _state(index: TrainingIndex) -> tuple[int, list[str]]:
    return (index.root / BLOB_NAME).stat().st_size, index.ids("train") + index.ids("test")


def test_index_add_refuses_taken_ids_and_unknown_classes_before_writing(index_8px, tmp_path):
    before = _state(index_8px)
    (tmp_path / "taken" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "taken" / "train" / "cat" / "0000.png").write_bytes(image_bytes(random_pixels(9), "PNG"))
    with pytest.raises(InvalidInputError, match=r"1 sample id\(s\) are already in the index: train/cat/0000"):
        add_images(index_8px, tmp_path / "taken")
    _new_samples(tmp_path / "fox", classes=("fox",))
    with pytest.raises(InvalidInputError, match=r"class\(es\) fox are not classes of the index; the index has "
                                                r"cat, dog, eel"):
        add_images(index_8px, tmp_path / "fox")
    assert _state(index_8px) == before


def test_index_add_skips_forgotten_pixels(index_8px, tmp_path):
    forgotten = "train/dog/0001"
    pixels = index_8px.load([forgotten])[0].numpy().transpose(1, 2, 0)
    index_8px.forget([forgotten], "r1")
    (tmp_path / "again" / "train" / "dog").mkdir(parents=True)
    (tmp_path / "again" / "train" / "dog" / "other.png").write_bytes(image_bytes(pixels, "PNG"))
    result = add_images(index_8px, tmp_path / "again")
    assert result.stored == 0 and result.skipped_forgotten == 1
    assert "train/dog/other" not in index_8px.ids()


def test_a_failed_add_leaves_the_index_as_it_was_and_cuts_leftover_bytes(index_8px, tmp_path, monkeypatch):
    before = _state(index_8px)
    new = _new_samples(tmp_path / "batch")

    def fail(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(append_steps, "_commit", fail)
    with pytest.raises(sqlite3.OperationalError):
        add_images(index_8px, tmp_path / "batch")
    assert _state(index_8px) == before
    monkeypatch.undo()
    # Bytes an append killed before its commit left at the end are cut by the next one.
    with open(index_8px.root / BLOB_NAME, "ab") as blob:
        blob.write(b"left by a killed append" * 10)
    add_images(index_8px, tmp_path / "batch")
    assert (index_8px.root / BLOB_NAME).stat().st_size == before[0] + sum(
        r.length for r in index_8px.lookup(sorted(new)))
    assert index_8px.verify().ok


def test_an_add_matching_a_sample_forgotten_meanwhile_adds_nothing(index_8px, tmp_path, monkeypatch):
    live = "train/eel/0000"
    pixels = index_8px.load([live])[0].numpy().transpose(1, 2, 0)
    (tmp_path / "dup" / "train" / "eel").mkdir(parents=True)
    (tmp_path / "dup" / "train" / "eel" / "copy.png").write_bytes(image_bytes(pixels, "PNG"))
    before = _state(index_8px)
    write = append_steps._write_images

    def forget_while_writing(*args, **kwargs):
        out = write(*args, **kwargs)
        with TrainingIndex.open(index_8px.root) as other:  # another process forgets the original meanwhile
            other.forget([live], "r-meanwhile")
        return out

    monkeypatch.setattr(append_steps, "_write_images", forget_while_writing)
    with pytest.raises(ConflictError, match=r"match samples forgotten while they were written \(train/eel/copy\)"):
        add_images(index_8px, tmp_path / "dup")
    size, ids = _state(index_8px)
    assert size == before[0] and "train/eel/copy" not in ids and live not in ids
    assert pixel_hash(pixels.transpose(2, 0, 1)) == index_8px.tombstone(live).content_hash


def test_index_add_cli(index_8px, tmp_path):
    _new_samples(tmp_path / "batch")
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "index", "add", str(tmp_path / "batch"),
                                      "--index", str(index_8px.root)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"added 2 image(s) from {tmp_path / 'batch'} to {index_8px.root}; now 8 train")
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "index", "add", str(tmp_path / "batch"),
                                      "--index", str(index_8px.root)])
    assert result.exit_code == 1 and "are already in the index" in result.output


def test_a_format_2_index_opens_as_format_3(index_8px):
    with sqlite3.connect(index_8px.root / DB_NAME) as raw:
        raw.execute("UPDATE meta SET value = '2' WHERE key = 'format_version'")
    with TrainingIndex.open(index_8px.root) as again:
        assert again.image_shape == (3, 8, 8) and again.verify().ok
    with sqlite3.connect(index_8px.root / DB_NAME) as raw:
        assert raw.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone() == ("3",)
    assert os.stat(index_8px.root / DB_NAME).st_mode & 0o077 == 0


def test_index_add_reads_a_zip_of_a_tree(index_8px, tmp_path):
    new = _new_samples(tmp_path / "batch", classes=("dog",))
    result = add_images(index_8px, zip_tree(tmp_path / "batch", tmp_path / "batch.zip", prefix="collected/"))
    assert result.sample_ids == sorted(new) and index_8px.verify().ok
    (tmp_path / "notes.txt").write_text("not a zip")
    with pytest.raises(InvalidInputError, match="notes.txt is not a readable zip file"):
        add_images(index_8px, tmp_path / "notes.txt")


def test_train_cli_on_a_mixed_index_needs_an_input_size_and_records_it(photo_tree, tmp_path):
    from tmu_core.cli import train_cmd  # noqa: F401  attaches the train command
    from tmu_core.train import load_checkpoint

    root, _ = photo_tree
    ingest_image_folder(root, tmp_path / "index").close()
    base = ["--home", str(tmp_path / "home"), "train", "--model", "p", "--epochs", "1", "--batch-size", "4",
            "--device", "cpu", "--no-progress", "--index", str(tmp_path / "index"), "--out", str(tmp_path / "p.pt")]
    refused = CliRunner().invoke(cli, base)
    assert refused.exit_code == 1 and "mixed sizes; train through a preprocessing" in refused.output
    done = CliRunner().invoke(cli, [*base, "--image-size", "16", "--resize", "20"])
    assert done.exit_code == 0, done.output
    _, meta = load_checkpoint(tmp_path / "p.pt", "cpu")
    assert meta.image_size == 16 and Preprocess.from_meta(meta) == PRE
