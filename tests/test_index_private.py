"""Owner ids hidden in tombstones (keyed HMAC), owner-only file modes, and the migration of an older index."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from test_index_support import make_tree

from tmu_core.errors import CheckpointError, UnknownIdsError
from tmu_core.index import TrainingIndex, ingest_image_folder

ALICE = "alice@example.com"
OWNERS = {"train/cat/0000": ALICE, "train/dog/0001": ALICE, "test/eel/0000": ALICE, "train/eel/0001": "bob"}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the usual default, under which files come out world-readable unless made private
    yield
    os.umask(old)


@pytest.fixture
def index(tmp_path, umask_022):
    make_tree(tmp_path / "src", train=2, test=1)
    idx = ingest_image_folder(tmp_path / "src", tmp_path / "index", owners=OWNERS)
    yield idx
    idx.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _files_holding(folder: Path, needle: bytes) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and needle in p.read_bytes())


def _tombstone_values(folder: Path) -> list[str]:
    with sqlite3.connect(folder / "index.sqlite") as raw:
        return [str(v) for row in raw.execute("SELECT * FROM tombstones") for v in row]


def test_tombstones_keep_an_hmac_not_the_owner_id(index, tmp_path):
    ids = index.ids_for_owners([ALICE], split=None)
    assert ids == ["test/eel/0000", "train/cat/0000", "train/dog/0001"]
    index.forget(ids, "gdpr-1")
    values = _tombstone_values(tmp_path / "index")
    assert values and not any(ALICE in v for v in values)
    assert index.owner_hmac(ALICE) in values and len(index.owner_hmac(ALICE)) == 64
    assert _files_holding(tmp_path / "index", ALICE.encode()) == []  # no copy in the database, its WAL or blobs
    assert index.ids_for_owners([ALICE], split=None) == [] and index.ids_for_owners([ALICE, "bob"]) == [
        "train/eel/0001"]
    with pytest.raises(UnknownIdsError) as err:
        index.ids_for_owners([ALICE, "carol@example.com"], split=None)
    assert err.value.ids == ["carol@example.com"]


def test_other_indexes_use_other_keys(index, tmp_path):
    other = ingest_image_folder(tmp_path / "src", tmp_path / "other", owners=OWNERS)
    assert other.owner_hmac(ALICE) != index.owner_hmac(ALICE)
    other.close()


def test_build_creates_owner_only_files(index, tmp_path):
    folder = tmp_path / "index"
    index.forget(["train/cat/0001"], "r-1")
    index.ids("train")  # the connection is open, so the WAL and shared-memory files exist now
    names = {p.name for p in folder.iterdir()}
    assert _mode(folder) == 0o700
    assert {p.name: _mode(p) for p in folder.iterdir()} == {name: 0o600 for name in names}
    assert {"index.sqlite", "blobs.bin", "id.key", "index.sqlite-wal", "index.sqlite-shm"} <= names
    assert len((folder / "id.key").read_bytes()) == 32


def test_open_narrows_the_modes_of_an_index_made_world_readable(index, tmp_path):
    folder = tmp_path / "index"
    index.close()
    os.chmod(folder, 0o755)
    for path in folder.iterdir():
        os.chmod(path, 0o644)
    with TrainingIndex.open(folder) as reopened:
        reopened.ids("train")
        assert _mode(folder) == 0o700
        assert {p.name: _mode(p) for p in folder.iterdir()} == {p.name: 0o600 for p in folder.iterdir()}


def _make_format_1(folder: Path, plain: dict[str, str]) -> None:
    """Turn a current index into what the format-1 code left: plain owner ids, no key, world-readable modes."""
    with sqlite3.connect(folder / "index.sqlite") as raw:
        raw.execute("ALTER TABLE tombstones RENAME COLUMN owner_hmac TO owner_id")
        raw.executemany("UPDATE tombstones SET owner_id = ? WHERE sample_id = ?", [(o, s) for s, o in plain.items()])
        raw.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
        raw.execute("DELETE FROM meta WHERE key = 'build'")
    raw.close()
    (folder / "id.key").unlink()
    os.chmod(folder, 0o755)
    for path in folder.iterdir():
        os.chmod(path, 0o644)


def test_open_migrates_a_format_1_index_and_narrows_its_modes(index, tmp_path):
    folder = tmp_path / "index"
    forgotten = {sid: ALICE for sid in index.ids_for_owners([ALICE], split=None)}
    index.forget(sorted(forgotten), "gdpr-1")
    index.close()
    _make_format_1(folder, forgotten)
    assert ALICE in _tombstone_values(folder) and _mode(folder / "blobs.bin") == 0o644
    with TrainingIndex.open(folder) as reopened:
        assert _mode(folder) == 0o700 and all(_mode(p) == 0o600 for p in folder.iterdir())
        assert not any(ALICE in v for v in _tombstone_values(folder))
        assert reopened.tombstone("train/cat/0000").owner_hmac == reopened.owner_hmac(ALICE)
        assert reopened.ids_for_owners([ALICE], split=None) == [] and reopened.build_record() is None
        assert reopened.verify().ok
    assert _files_holding(folder, ALICE.encode()) == []
    with TrainingIndex.open(folder) as again:  # a second open finds format 2 and changes nothing
        assert again.ids_for_owners([ALICE]) == []


def test_missing_key_is_refused_when_tombstones_need_it(index, tmp_path):
    index.forget(["train/cat/0000"], "gdpr-1")
    index.close()
    (tmp_path / "index" / "id.key").unlink()
    with pytest.raises(CheckpointError, match=r"id.key is missing, but the index's tombstones hold owner HMACs"):
        TrainingIndex.open(tmp_path / "index")


def test_key_of_wrong_length_is_refused(index, tmp_path):
    index.close()
    (tmp_path / "index" / "id.key").write_bytes(b"short")
    with pytest.raises(CheckpointError, match=r"id.key holds 5 bytes; an index key is exactly 32 random bytes"):
        TrainingIndex.open(tmp_path / "index")
