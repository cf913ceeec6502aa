"""Forgetting: bytes wiped for good, tombstones, repeated requests, and a crash between the steps."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_index_support import make_tree

from tmu_core.errors import ConflictError, InvalidInputError, UnknownIdsError
from tmu_core.index import ForgetResult, TrainingIndex, ingest_digits, ingest_image_folder

CRASH_SCRIPT = """
import os, sys
from tmu_core.index import TrainingIndex
from tmu_core.index import forget as steps

steps._between_steps = lambda: os._exit(17)
index = TrainingIndex.open(sys.argv[1])
index.forget(sys.argv[2].split(","), "crash-request")
os._exit(0)
"""


@pytest.fixture
def index(tmp_path):
    make_tree(tmp_path / "src", train=4, test=2)
    idx = ingest_image_folder(tmp_path / "src", tmp_path / "index")
    yield idx
    idx.close()


def _files_holding(folder: Path, needle: bytes) -> list[str]:
    """Names of the index files (blobs.bin, index.sqlite, -wal, -shm) whose raw bytes contain ``needle``."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and needle in p.read_bytes())


def _encoded(tmp_path: Path, sample_id: str) -> bytes:
    return (tmp_path / "src" / f"{sample_id}.png").read_bytes()


def test_forget_wipes_bytes_everywhere_on_disk(index, tmp_path):
    target = "train/dog/0002"
    needle = _encoded(tmp_path, target)
    assert _files_holding(tmp_path / "index", needle) == ["blobs.bin"]
    record = index.lookup([target])[0]
    result = index.forget([target], "req-1")
    assert result == ForgetResult("req-1", [target], [], repeated=False)
    assert _files_holding(tmp_path / "index", needle) == []
    blobs = (tmp_path / "index" / "blobs.bin").read_bytes()
    assert blobs[record.offset:record.offset + record.length] == bytes(record.length)
    assert target not in index.ids("train")
    assert index.is_forgotten(target) and not index.is_forgotten("train/dog/0001")
    stone = index.tombstone(target)
    assert (stone.sample_id, stone.content_hash, stone.request_id) == (target, record.content_hash, "req-1")
    assert index.tombstone("train/dog/0001") is None
    with pytest.raises(UnknownIdsError):
        index.load([target])
    assert index.verify().ok
    assert index.info().tombstones == 1 and index.info().counts["train"] == 11


def test_neighbours_survive_a_forget(index, tmp_path):
    keep = [i for i in index.ids("train") if i != "train/cat/0001"]
    before = index.load(keep)
    index.forget(["train/cat/0001"], "req-n")
    assert (index.load(keep) == before).all()


def test_repeated_and_overlapping_requests(index):
    first = index.forget(["train/cat/0000", "train/cat/0001"], "req-a")
    again = index.forget(["train/cat/0001", "train/cat/0000", "train/cat/0000"], "req-a")
    assert again == ForgetResult("req-a", first.forgotten, [], repeated=True)
    overlap = index.forget(["train/cat/0001", "train/cat/0002"], "req-b")
    assert overlap == ForgetResult("req-b", ["train/cat/0002"], ["train/cat/0001"], repeated=False)
    with pytest.raises(ConflictError, match="request 'req-a' was already carried out with other sample ids"):
        index.forget(["train/eel/0000"], "req-a")
    assert not index.is_forgotten("train/eel/0000")


def test_forget_rejects_bad_requests_and_changes_nothing(index):
    with pytest.raises(InvalidInputError, match="no sample ids to forget"):
        index.forget([], "req")
    with pytest.raises(UnknownIdsError, match=r"2 unknown sample id\(s\): ghost, train/cat/0099") as err:
        index.forget(["train/cat/0000", "ghost", "train/cat/0099"], "req")
    assert err.value.ids == ["ghost", "train/cat/0099"]
    with pytest.raises(InvalidInputError, match="request_id must be a non-empty string"):
        index.forget(["train/cat/0000"], " ")
    assert index.info().tombstones == 0 and index.verify().ok
    assert index.forget(["train/cat/0000"], "req").forgotten == ["train/cat/0000"]


def test_test_split_samples_can_be_forgotten(index, tmp_path):
    target = "test/eel/0001"
    needle = _encoded(tmp_path, target)
    record = index.lookup([target])[0]
    result = index.forget(["train/cat/0000", target], "req-t")
    assert result == ForgetResult("req-t", [target, "train/cat/0000"], [], repeated=False)
    assert index.tombstone(target).content_hash == record.content_hash and index.is_forgotten(target)
    blobs = (tmp_path / "index" / "blobs.bin").read_bytes()
    assert blobs[record.offset:record.offset + record.length] == bytes(record.length)
    assert _files_holding(tmp_path / "index", needle) == []
    assert target not in index.ids("test") and index.info().counts == {"train": 11, "test": 5}
    report = index.verify()
    assert report.ok and report.checked == 18


def test_owner_ids_cover_both_splits(tmp_path):
    make_tree(tmp_path / "src", train=2, test=1)
    owners = {"train/cat/0000": "alice", "test/dog/0000": "alice"}
    with ingest_image_folder(tmp_path / "src", tmp_path / "index", owners=owners) as idx:
        assert idx.ids_for_owners(["alice"]) == ["train/cat/0000"]
        assert idx.ids_for_owners(["alice"], split="test") == ["test/dog/0000"]
        both = idx.ids_for_owners(["alice"], split=None)
        assert both == ["test/dog/0000", "train/cat/0000"]
        assert idx.forget(both, "gdpr-both").forgotten == both
        assert idx.ids_for_owners(["alice"], split=None) == [] and idx.verify().ok


def test_owner_lookup_after_forget(tmp_path):
    make_tree(tmp_path / "src", train=2, test=1)
    owners = {"train/cat/0000": "alice", "train/dog/0001": "alice"}
    idx = ingest_image_folder(tmp_path / "src", tmp_path / "index", owners=owners)
    ids = idx.ids_for_owners(["alice"])
    idx.forget(ids, "gdpr-1")
    assert idx.ids_for_owners(["alice"]) == []
    assert idx.tombstone("train/cat/0000").owner_hmac == idx.owner_hmac("alice") != "alice"
    assert idx.forget(ids, "gdpr-2") == ForgetResult("gdpr-2", [], ids, repeated=False)


def test_digits_raw_pixels_are_wiped(tmp_path):
    idx = ingest_digits(tmp_path / "d")
    target = idx.ids("train")[7]
    pixels = idx.load([target]).numpy().tobytes()
    assert _files_holding(tmp_path / "d", pixels) == ["blobs.bin"]
    idx.forget([target], "d-1")
    assert _files_holding(tmp_path / "d", pixels) == []
    assert idx.verify().ok


def test_crash_between_tombstone_and_wipe_is_repaired_on_open(index, tmp_path):
    targets = ["train/eel/0000", "train/eel/0003"]
    needles = [_encoded(tmp_path, t) for t in targets]
    folder = tmp_path / "index"
    done = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(folder), ",".join(targets)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 17, done.stderr
    # Killed after step 1: tombstones committed, bytes still on disk, wipes pending.
    assert all(_files_holding(folder, n) == ["blobs.bin"] for n in needles)
    with sqlite3.connect(folder / "index.sqlite") as raw:
        assert sorted(r[0] for r in raw.execute("SELECT sample_id FROM pending_wipe")) == targets
    assert index.verify().unwiped == targets
    reopened = TrainingIndex.open(folder)
    assert all(_files_holding(folder, n) == [] for n in needles)
    report = reopened.verify()
    assert report.ok and report.checked == 18
    assert all(reopened.is_forgotten(t) for t in targets)
    assert reopened.forget(targets, "crash-request").repeated
    with sqlite3.connect(folder / "index.sqlite") as raw:
        assert raw.execute("SELECT COUNT(*) FROM pending_wipe").fetchone()[0] == 0
    TrainingIndex.open(folder).close()  # redoing an empty to-do list is harmless


def test_verify_reports_damaged_samples(index, tmp_path):
    record = index.lookup(["train/dog/0000"])[0]
    with open(tmp_path / "index" / "blobs.bin", "r+b") as blob:
        blob.seek(record.offset + record.length // 2)  # inside the pixel data, not the trailing IEND chunk
        blob.write(b"\x00" * 4)
    report = index.verify()
    assert not report.ok and report.bad == ["train/dog/0000"] and report.unwiped == []
