"""Rebuilding an index over an old one (``overwrite``): tombstones and requests survive, forgotten images stay out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_index_support import image_bytes, make_tree

from tmu_core.cli import cli
from tmu_core.errors import ConflictError
from tmu_core.index import ForgottenFilter, TrainingIndex, ingest_digits, ingest_image_folder
from tmu_core.index.sources import SourceImage
from tmu_core.index.writer import IndexWriter

OWNERS = {"train/cat/0001": "alice@example.com", "test/dog/0000": "alice@example.com",
          "train/eel/0002": "bob@example.com"}
FORGET = ["test/dog/0000", "train/cat/0001"]


def files_holding(root: Path, needle: bytes, skip: Path | None = None) -> list[str]:
    """Paths (relative to ``root``) of every file under ``root``, outside ``skip``, whose bytes contain ``needle``."""
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and (skip is None or skip not in path.parents) and needle in path.read_bytes():
            hits.append(path.relative_to(root).as_posix())
    return hits


@pytest.fixture
def source(tmp_path):
    """A tree, an index of it with owners, and two forgotten samples (one of them from the test split)."""
    pixels = make_tree(tmp_path / "src", train=4, test=2)
    with ingest_image_folder(tmp_path / "src", tmp_path / "index", owners=OWNERS) as index:
        index.forget(FORGET, "gdpr-1")
    return pixels


def _needles(tmp_path: Path, pixels: dict, sample_id: str) -> list[bytes]:
    encoded = (tmp_path / "src" / f"{sample_id}.png").read_bytes()
    return [encoded, pixels[sample_id].transpose(2, 0, 1).tobytes()]  # the file, and its (C, H, W) pixels


def test_rebuild_keeps_tombstones_and_skips_forgotten_images(source, tmp_path):
    before = {sid: TrainingIndex.open(tmp_path / "index").tombstone(sid) for sid in FORGET}
    # The same pixels under a new name are refused by their hash, not only by their id.
    (tmp_path / "src" / "train" / "eel" / "0099.png").write_bytes(image_bytes(source["train/cat/0001"], "PNG"))
    with ingest_image_folder(tmp_path / "src", tmp_path / "index", owners=OWNERS, overwrite=True) as index:
        assert index.build_record().skipped_forgotten == 3 and index.build_record().tombstones_kept == 2
        assert index.info().tombstones == 2 and index.info().counts == {"train": 11, "test": 5}
        for sid in FORGET:
            stone = index.tombstone(sid)
            assert stone.owner_hmac == before[sid].owner_hmac and stone.content_hash == before[sid].content_hash
            assert stone.request_id == "gdpr-1" and (stone.offset, stone.length) == (0, 0)
            assert sid not in index.ids("train") + index.ids("test")
        assert "train/eel/0099" not in index.ids("train")
        assert index.forget(list(reversed(FORGET)), "gdpr-1").repeated  # the request record survived too
        assert index.ids_for_owners(["alice@example.com"], split=None) == []
        assert index.verify().ok
    for sid in FORGET:
        for needle in _needles(tmp_path, source, sid):
            assert files_holding(tmp_path, needle, skip=tmp_path / "src") == []


def test_rebuild_keeps_the_key_and_folder_private(source, tmp_path):
    key = (tmp_path / "index" / "id.key").read_bytes()
    ingest_image_folder(tmp_path / "src", tmp_path / "index", overwrite=True).close()
    assert (tmp_path / "index" / "id.key").read_bytes() == key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "src"]  # no partial or old copy left


def test_digits_rebuild_leaves_out_forgotten_raw_pixels(tmp_path):
    with ingest_digits(tmp_path / "d") as index:
        targets = [index.ids("train")[3], index.ids("test")[5]]
        pixels = [index.load([t]).numpy().tobytes() for t in targets]
        index.forget(targets, "d-1")
    with ingest_digits(tmp_path / "d", overwrite=True) as index:
        assert index.build_record().skipped_forgotten == 2
        assert index.info().counts == {"train": 1437, "test": 358} and index.verify().ok
    assert all(files_holding(tmp_path, p) == [] for p in pixels)


def test_forget_during_a_rebuild_fails_the_rebuild(source, tmp_path):
    data = (tmp_path / "src" / "train" / "dog" / "0000.png").read_bytes()
    with IndexWriter(tmp_path / "index", ["cat", "dog", "eel"], overwrite=True) as writer:
        assert writer.add(SourceImage("train/dog/0000", 1, "train", "dog0", data))
        with TrainingIndex.open(tmp_path / "index") as old:
            old.forget(["train/dog/0000"], "gdpr-2")
        with pytest.raises(ConflictError, match="forgot samples while it was being rebuilt; build it again"):
            writer.finish()
    assert files_holding(tmp_path, data, skip=tmp_path / "src") == []


def test_forgotten_filter_refuses_ids_and_hashes(source, tmp_path):
    with TrainingIndex.open(tmp_path / "index") as index:
        refused = index.forgotten_filter()
        digest = index.tombstone("train/cat/0001").content_hash
    assert refused.refuses("train/cat/0001") and refused.refuses("new/id", digest)
    assert not refused.refuses("train/cat/0000") and not refused.refuses("new/id", "0" * 64)
    assert not ForgottenFilter().refuses("train/cat/0001", digest)


def test_cli_rebuild_prints_how_many_forgotten_images_it_skipped(tmp_path):
    make_tree(tmp_path / "src", train=4, test=2)
    dest = tmp_path / "index"
    runner = CliRunner()
    build = ["--home", str(tmp_path / "home"), "index", "build", "--folder", str(tmp_path / "src"),
             "--index", str(dest)]
    assert runner.invoke(cli, build).exit_code == 0
    with TrainingIndex.open(dest) as index:
        index.forget(["train/cat/0001", "train/dog/0003"], "gdpr-1")
    result = runner.invoke(cli, [*build, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert result.output == (f"indexed 10 train and 6 test images (3 classes, shape 3x8x8) into {dest}\n"
                             "skipped 2 forgotten image(s); kept 2 tombstone(s) of the replaced index\n")
    info = runner.invoke(cli, ["--home", str(tmp_path / "home"), "index", "info", "--index", str(dest)])
    assert "tombstones: 2" in info.output.splitlines()
    shutil.rmtree(dest)
    fresh = runner.invoke(cli, build)
    assert fresh.output == f"indexed 12 train and 6 test images (3 classes, shape 3x8x8) into {dest}\n"
