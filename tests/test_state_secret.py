"""The workspace secret: created once with mode 0600, refused when others can read it or its size is wrong."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest

from tmu_core.errors import CheckpointError, InvalidInputError
from tmu_core.state.audit import AuditLog
from tmu_core.state.secret import SECRET_BYTES, keyed_id, load_or_create_secret


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_once_with_mode_0600_even_under_a_wide_umask(tmp_path: Path) -> None:
    path = tmp_path / "home" / "secret.key"
    old = os.umask(0)
    try:
        secret = load_or_create_secret(path)
    finally:
        os.umask(old)
    assert len(secret) == SECRET_BYTES and path.read_bytes() == secret
    assert _mode(path) == 0o600
    assert load_or_create_secret(path) == secret
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.key"]  # no temporary file left behind


def test_audit_log_makes_its_secret_beside_the_database(tmp_path: Path) -> None:
    AuditLog(tmp_path / "state.sqlite")
    assert _mode(tmp_path / "secret.key") == 0o600 and len((tmp_path / "secret.key").read_bytes()) == 32


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_secret_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret.key"
    load_or_create_secret(path)
    path.chmod(mode)
    with pytest.raises(CheckpointError, match=f"has mode {mode:04o}, open to group or others; accepted: 0600"):
        load_or_create_secret(path)
    with pytest.raises(CheckpointError, match="open to group or others"):
        AuditLog(tmp_path / "state.sqlite")


@pytest.mark.parametrize("size", [0, 16, 33])
def test_secret_of_the_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(CheckpointError, match=f"holds {size} bytes; a workspace secret is exactly 32"):
        load_or_create_secret(path)
    assert path.read_bytes() == b"k" * size  # refused, never replaced


def test_secret_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.key").mkdir()
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load_or_create_secret(tmp_path / "secret.key")


def test_keyed_id_is_hex_hmac_sha256() -> None:
    secret = bytes(range(32))
    expected = hmac.new(secret, b"train/cat/0001", hashlib.sha256).hexdigest()
    assert keyed_id(secret, "train/cat/0001") == expected
    assert keyed_id(secret, "train/cat/0001") != hashlib.sha256(b"train/cat/0001").hexdigest()
    assert keyed_id(bytes(32), "train/cat/0001") != expected
    with pytest.raises(InvalidInputError, match="empty key"):
        keyed_id(b"", "train/cat/0001")
