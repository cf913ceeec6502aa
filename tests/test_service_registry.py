"""VersionRegistry on a real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tmu_core.errors import CheckpointError, ConflictError, InvalidInputError, ModelNotFoundError
from tmu_core.state.versions import VersionRegistry, file_sha256


def _files(tmp_path: Path, version: int) -> tuple[Path, Path, Path]:
    folder = tmp_path / f"v{version}"
    folder.mkdir()
    paths = []
    for name in ("m.mar", "checkpoint.pt", "model.onnx"):
        path = folder / name
        path.write_bytes(f"{name}-{version}".encode())
        paths.append(path)
    return paths[0], paths[1], paths[2]


def test_record_hashes_files_and_supersedes(tmp_path: Path) -> None:
    reg = VersionRegistry(tmp_path / "state.sqlite")
    assert reg.next_version("m") == 1
    assert reg.latest("m") is None
    v1 = reg.record_version("m", 1, *_files(tmp_path, 1), parent=None, forget_request=None, metrics={"acc": 0.9})
    assert v1.state == "serving"
    assert v1.archive_sha256 == file_sha256(tmp_path / "v1" / "m.mar")
    v2 = reg.record_version("m", 2, *_files(tmp_path, 2), parent=1, forget_request="fj-1", metrics={})
    assert [r.state for r in reg.versions("m")] == ["superseded", "serving"]
    assert reg.serving("m") == v2
    assert reg.latest("m").version == 2 and reg.next_version("m") == 3
    assert reg.get("m", 2).forget_request == "fj-1" and reg.get("m", 2).parent == 1
    assert reg.get("m", 1).metrics == {"acc": 0.9}


def test_wal_mode_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    VersionRegistry(db).record_version("m", 1, *_files(tmp_path, 1), parent=None, forget_request=None, metrics={})
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert VersionRegistry(db).get("m", 1).version == 1


def test_errors_name_the_item(tmp_path: Path) -> None:
    reg = VersionRegistry(tmp_path / "state.sqlite")
    archive, ckpt, onnx = _files(tmp_path, 1)
    with pytest.raises(ModelNotFoundError, match="no recorded versions"):
        reg.get("m", 1)
    reg.record_version("m", 1, archive, ckpt, None, parent=None, forget_request=None, metrics={})
    with pytest.raises(ConflictError, match="already has a version 1; the next free one is 2"):
        reg.record_version("m", 1, archive, ckpt, None, parent=None, forget_request=None, metrics={})
    with pytest.raises(ModelNotFoundError, match="no version 7; known versions: 1"):
        reg.get("m", 7)
    with pytest.raises(InvalidInputError, match="integer >= 1"):
        reg.record_version("m", 0, archive, ckpt, None, parent=None, forget_request=None, metrics={})
    with pytest.raises(CheckpointError, match="does not exist"):
        reg.record_version("m", 2, tmp_path / "missing.mar", ckpt, None, parent=None, forget_request=None,
                           metrics={})
    with pytest.raises(InvalidInputError, match="state must be"):
        reg.set_state("m", 1, "gone")


def test_set_state_serving_demotes_other(tmp_path: Path) -> None:
    reg = VersionRegistry(tmp_path / "state.sqlite")
    reg.record_version("m", 1, *_files(tmp_path, 1), parent=None, forget_request=None, metrics={})
    reg.record_version("m", 2, *_files(tmp_path, 2), parent=1, forget_request=None, metrics={})
    reg.set_state("m", 1, "serving")
    assert [r.state for r in reg.versions("m")] == ["serving", "superseded"]
    reg.set_state("m", 2, "rolled_back")
    assert reg.get("m", 2).state == "rolled_back"
    assert reg.models() == ["m"]
