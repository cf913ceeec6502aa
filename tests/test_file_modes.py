"""Workspace files are the owner's only: folders 0700, files 0600, from the CLI, the service and the library."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tmu_core.config import Workspace, make_private, secure_mkdir
from tmu_core.errors import JobNotFoundError
from tmu_core.forget import worker
from tmu_core.service import server
from tmu_core.state.db import connect
from tmu_core.state.jobs import JobStore
from tmu_core.state.locks import writer_lock

CLI = [sys.executable, "-c", "from tmu_core.cli import cli; cli()"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _open_to_others(*roots: Path) -> dict[str, str]:
    """Every file or folder under ``roots`` (the roots included) with a group or other permission bit."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if _mode(path) & 0o077:
                found[str(path)] = oct(_mode(path))
    return found


@pytest.fixture()
def wide_umask():
    old = os.umask(0o022)  # the usual default, under which files come out world-readable unless made private
    yield
    os.umask(old)


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 3)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _tmu_admin(workspace: Workspace, *args: str) -> str:
    base = ["--home", str(workspace.home), "--model-store", str(workspace.model_store)]
    done = subprocess.run([*CLI, *base, *args], capture_output=True, text=True, timeout=300, umask=0o022)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.integration
def test_cli_commands_write_owner_only_files(tmp_path):
    data = _image_folder(tmp_path / "data")
    workspace = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    _tmu_admin(workspace, "index", "build", "--folder", str(data))
    _tmu_admin(workspace, "train", "--model", "tiny", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
               "--no-progress")
    checkpoint = workspace.version_dir("tiny", 1) / "checkpoint.pt"
    _tmu_admin(workspace, "package", str(checkpoint), "--model", "tiny")
    written = {p.relative_to(tmp_path).as_posix() for p in [*workspace.home.rglob("*"),
                                                             *workspace.model_store.rglob("*")] if p.is_file()}
    assert {"home/index/blobs.bin", "home/index/index.sqlite", "home/state.sqlite",
            "home/models/tiny/v1/checkpoint.pt", "home/models/tiny/v1/model.onnx", "store/tiny-v1.mar"} <= written
    assert _open_to_others(workspace.home, workspace.model_store) == {}


def test_background_service_files_are_owner_only(tmp_path, wide_umask):
    workspace = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    info = server.start(workspace, server.ServiceConfig(worker=server.WorkerSettings(device="cpu")))
    try:
        names = {p.name for p in workspace.serve_dir.iterdir()}
        assert {"extension.key", "extension.json", "extension.pid", "extension.log"} <= names
        assert (workspace.home / "writer.lock").is_file() and info.pid
        assert _open_to_others(workspace.home, workspace.model_store) == {}
    finally:
        server.stop(workspace)


def test_in_process_service_secrets_are_private_under_any_umask(tmp_path):
    workspace = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    old = os.umask(0)
    try:
        with server.in_process(workspace, server.ServiceConfig(run_jobs=False)):
            for path in (server.key_path(workspace), workspace.home / "writer.lock", workspace.state_db):
                assert _mode(path) == 0o600, path
            for folder in (workspace.home, workspace.serve_dir, workspace.locks_dir, workspace.model_store):
                assert _mode(folder) == 0o700, folder
    finally:
        os.umask(old)


def test_state_database_and_its_wal_are_private(tmp_path, wide_umask):
    db = tmp_path / "home" / "state.sqlite"
    JobStore(db).submit("m", ["s1"], owner_ids=[], options={})
    conn = connect(db)  # an open connection keeps the -wal and -shm files
    try:
        conn.execute("SELECT 1").fetchall()
        files = [db, *(p for p in (Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())]
        assert len(files) == 3
        assert {p.name: oct(_mode(p)) for p in files} == {p.name: "0o600" for p in files}
        assert _mode(db.parent) == 0o700
    finally:
        conn.close()


def test_an_existing_wide_database_is_narrowed(tmp_path, wide_umask):
    db = tmp_path / "state.sqlite"
    connect(db).close()
    os.chmod(db, 0o644)
    connect(db).close()
    assert _mode(db) == 0o600


def test_ensure_dirs_makes_private_folders(tmp_path, wide_umask):
    workspace = Workspace(home=tmp_path / "a" / "home", model_store=tmp_path / "b" / "store")
    workspace.ensure_dirs()
    folders = [workspace.home, workspace.serve_dir, workspace.locks_dir, workspace.models_dir,
               workspace.model_store, tmp_path / "a", tmp_path / "b"]
    assert {str(f): oct(_mode(f)) for f in folders} == {str(f): "0o700" for f in folders}


def test_secure_mkdir_narrows_an_existing_folder_only_when_asked(tmp_path):
    folder = tmp_path / "serve"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    secure_mkdir(folder)
    assert _mode(folder) == 0o755  # home and model store may be the operator's own folders: left alone
    secure_mkdir(folder, tighten=True)
    assert _mode(folder) == 0o700


def test_make_private_narrows_wide_files_and_skips_missing_ones(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    os.chmod(path, 0o640)
    make_private(path)
    assert _mode(path) == 0o600
    os.chmod(path, 0o400)
    make_private(path)
    assert _mode(path) == 0o400  # already private: left as it is
    make_private(tmp_path / "missing")


def test_worker_entry_point_sets_the_private_umask(tmp_path, wide_umask):
    argv = ["--job", "j-none", "--home", str(tmp_path / "home"), "--model-store", str(tmp_path / "store")]
    with pytest.raises(JobNotFoundError):
        worker.main(argv)
    assert os.umask(0o022) == 0o077


def test_service_entry_point_sets_the_private_umask_and_refuses_a_second_writer(tmp_path, wide_umask):
    workspace = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    with writer_lock(workspace):
        code = server.main(["--home", str(workspace.home), "--model-store", str(workspace.model_store)])
    assert code == 3 and os.umask(0o022) == 0o077
    assert not server.key_path(workspace).exists()
