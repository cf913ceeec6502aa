"""Every bad input to ingest gives an error that names the item; nothing half-written is left behind."""

from __future__ import annotations

import pytest
from test_index_support import image_bytes, make_tree, random_pixels, zip_tree

from tmu_core.errors import ConflictError, InvalidInputError
from tmu_core.index import TrainingIndex, ingest_digits, ingest_image_folder, ingest_zip
from tmu_core.index.sources import SourceImage
from tmu_core.index.writer import IndexWriter


@pytest.fixture
def tree(tmp_path):
    make_tree(tmp_path / "src", train=2, test=1)
    return tmp_path / "src"


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_corrupt_image_is_named_and_nothing_is_written(tree, tmp_path):
    bad = tree / "train" / "dog" / "0001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 5)
    with pytest.raises(InvalidInputError, match=r"src/train/dog/0001\.png: not a readable image"):
        ingest_image_folder(tree, tmp_path / "index")
    assert not (tmp_path / "index").exists()
    assert _leftovers(tmp_path) == []


def test_a_format_not_accepted_is_named_with_the_accepted_ones(tree, tmp_path):
    from PIL import Image

    Image.fromarray(random_pixels(1)).save(tree / "train" / "cat" / "0009.jpg", format="PPM")
    with pytest.raises(InvalidInputError, match=r"train/cat/0009\.jpg: PPM images are not accepted; "
                                                r"expected JPEG, PNG, WebP, BMP, GIF or TIFF"):
        ingest_image_folder(tree, tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_test_class_missing_from_train_is_named(tree, tmp_path):
    (tree / "test" / "fox").mkdir()
    (tree / "test" / "fox" / "0000.png").write_bytes(image_bytes(random_pixels(3), "PNG"))
    with pytest.raises(InvalidInputError, match=r"class folder\(s\) test/fox have no train/ folder; "
                                                r"train classes: cat, dog, eel"):
        ingest_image_folder(tree, tmp_path / "index")


def test_unexpected_file_and_duplicate_stem(tree, tmp_path):
    (tree / "train" / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(InvalidInputError, match=r"unexpected file train/cat/notes\.txt"):
        ingest_image_folder(tree, tmp_path / "index")
    (tree / "train" / "cat" / "notes.txt").unlink()
    (tree / "train" / "cat" / "0000.jpg").write_bytes(image_bytes(random_pixels(6), "JPEG"))
    with pytest.raises(InvalidInputError, match=r"train/cat/0000\.jpg and train/cat/0000\.png give the same sample id"):
        ingest_image_folder(tree, tmp_path / "index")


def test_owner_mapping_with_unknown_samples_lists_them(tree, tmp_path):
    owners = tmp_path / "owners.csv"
    owners.write_text("sample_id,owner_id\ntrain/cat/0000,alice\ntrain/cat/0042,bob\nghost,carol\n")
    expected = r"owners file .*owners\.csv names 2 sample id\(s\) not in the data: ghost, train/cat/0042"
    with pytest.raises(InvalidInputError, match=expected):
        ingest_image_folder(tree, tmp_path / "index", owners=owners)
    assert not (tmp_path / "index").exists()


def test_owner_files_with_wrong_shape(tree, tmp_path):
    header = tmp_path / "h.csv"
    header.write_text("id,owner\na,b\n")
    with pytest.raises(InvalidInputError, match=r"first row must be the header sample_id,owner_id"):
        ingest_image_folder(tree, tmp_path / "index", owners=header)
    listing = tmp_path / "o.json"
    listing.write_text('["a", "b"]')
    with pytest.raises(InvalidInputError, match=r"must hold a JSON object \{sample_id: owner_id\}, got list"):
        ingest_image_folder(tree, tmp_path / "index", owners=listing)


def test_label_outside_classes_and_taken_ids_are_rejected(tmp_path):
    data = image_bytes(random_pixels(7), "PNG")
    with IndexWriter(tmp_path / "index", ["a", "b", "c"]) as writer:
        with pytest.raises(InvalidInputError, match=r"x/0\.png: label 3 is outside the classes 0\.\.2"):
            writer.add(SourceImage("train/x/0", 3, "train", "x/0.png", data))
        writer.add(SourceImage("train/x/0", 2, "train", "x/0.png", data))
        with pytest.raises(InvalidInputError, match=r"y/0\.png: sample id 'train/x/0' is already taken by x/0\.png"):
            writer.add(SourceImage("train/x/0", 1, "train", "y/0.png", data))
        with pytest.raises(InvalidInputError, match=r"owner mapping names 1 sample id\(s\) not in the data: zz"):
            writer.finish({"zz": "o"})
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_overwrite(tree, tmp_path):
    first = ingest_image_folder(tree, tmp_path / "index", train_per_class=1)
    first.close()
    with pytest.raises(ConflictError, match=r"index already exists; pass overwrite to replace it"):
        ingest_image_folder(tree, tmp_path / "index")
    second = ingest_image_folder(tree, tmp_path / "index", overwrite=True)
    assert len(second.ids("train")) == 6
    assert TrainingIndex.open(tmp_path / "index").ids("train") == second.ids("train")
    assert _leftovers(tmp_path) == []


def test_bad_limits_and_sources(tree, tmp_path):
    with pytest.raises(InvalidInputError, match="train_per_class must be a positive int or None, got 0"):
        ingest_image_folder(tree, tmp_path / "index", train_per_class=0)
    with pytest.raises(InvalidInputError, match="does not exist or is not a folder"):
        ingest_image_folder(tmp_path / "missing", tmp_path / "index")
    (tmp_path / "junk.zip").write_bytes(b"PK not really")
    with pytest.raises(InvalidInputError, match=r"junk\.zip is not a readable zip file"):
        ingest_zip(tmp_path / "junk.zip", tmp_path / "index")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match=r"has no train/<class>/ images"):
        ingest_image_folder(tmp_path / "empty", tmp_path / "index")
    with pytest.raises(InvalidInputError, match="test_fraction must be a number strictly between 0 and 1, got 1.5"):
        ingest_digits(tmp_path / "index", test_fraction=1.5)


def test_corrupt_image_inside_zip_is_named(tree, tmp_path):
    (tree / "test" / "eel" / "0000.png").write_bytes(b"nothing")
    archive = zip_tree(tree, tmp_path / "data.zip")
    with pytest.raises(InvalidInputError, match=r"data\.zip/test/eel/0000\.png: not a readable image"):
        ingest_zip(archive, tmp_path / "index")
    assert not (tmp_path / "index").exists()
