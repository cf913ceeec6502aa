"""Keep the index folder private: owner-only file modes, and the key that hides owner ids in tombstones.

The index folder is created 0700 and every file in it 0600, at creation time (never created wider and
narrowed later). An index made before this rule is narrowed when it is opened.

Tombstones keep a keyed HMAC-SHA256 of the owner id, not the owner id (often an e-mail address). The key is
32 random bytes in ``<root>/id.key``, made on the first build and carried across a rebuild, so an owner whose
samples were all forgotten is still recognised by recomputing the HMAC of the id a caller names.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO

from tmu_core.errors import CheckpointError

logger = logging.getLogger(__name__)

KEY_NAME = "id.key"
KEY_BYTES = 32
FILE_MODE = 0o600
DIR_MODE = 0o700
# Every file an index folder can hold: SQLite's WAL, shared-memory and rollback journal included.
INDEX_FILES = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "index.sqlite-journal", "blobs.bin",
               KEY_NAME)


def make_private_dir(path: Path) -> None:
    """Create folder ``path`` with mode 0700 (it must not exist yet)."""
    path.mkdir(mode=DIR_MODE)
    os.chmod(path, DIR_MODE)  # mkdir's mode is narrowed by the umask, never widened; set it exactly


def create_private_file(path: Path, data: bytes = b"") -> None:
    """Create ``path`` (which must not exist) with mode 0600 and write ``data`` to it, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def open_private_for_writing(path: Path) -> BinaryIO:
    """Create ``path`` (which must not exist) with mode 0600 and return it opened for binary writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "wb")


def _narrow(path: Path, mode: int) -> None:
    current = stat.S_IMODE(path.stat().st_mode)
    if current == mode:
        return
    try:
        os.chmod(path, mode)
    except OSError as err:
        logger.warning("cannot set mode %o on %s (now %o): %s", mode, path, current, err)
        return
    logger.info("narrowed mode of %s from %o to %o", path, current, mode)


def narrow_modes(root: Path) -> None:
    """Set the index folder to 0700 and each index file in it to 0600 (an index made with wider modes)."""
    _narrow(root, DIR_MODE)
    for name in INDEX_FILES:
        path = root / name
        if path.is_file():
            _narrow(path, FILE_MODE)


def read_key(root: Path) -> bytes | None:
    """The owner-id key of the index at ``root``, or None when the folder has no key file.

    Raises:
        CheckpointError: the key file does not hold exactly 32 bytes.
    """
    path = root / KEY_NAME
    if not path.is_file():
        return None
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise CheckpointError(f"{path} holds {len(key)} bytes; an index key is exactly {KEY_BYTES} random bytes")
    return key


def write_key(root: Path, key: bytes | None = None) -> bytes:
    """Write ``key`` (a new random one when None) to ``<root>/id.key`` with mode 0600 and return it."""
    key = secrets.token_bytes(KEY_BYTES) if key is None else key
    create_private_file(root / KEY_NAME, key)
    return key


def owner_hmac(key: bytes, owner_id: str) -> str:
    """Hex HMAC-SHA256 of ``owner_id``'s UTF-8 bytes under the index key: what a tombstone keeps."""
    return hmac.new(key, owner_id.encode("utf-8"), hashlib.sha256).hexdigest()
