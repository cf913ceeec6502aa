"""The workspace secret: 32 random bytes in ``<home>/secret.key`` that key every id the workspace stores.

Sample ids (``train/cat/0001``) and owner ids (often e-mail addresses) are guessable, so an unkeyed sha256 of one
is reversed by hashing a dictionary of candidates. Records keep ``keyed_id(secret, id)`` instead: without the
secret nobody can test a guess, and with it an auditor can still check whether a named id is in a record.

The file is made once, atomically (written to a private temporary file, fsynced, then hard-linked into place so
that two processes racing to create it end up sharing the winner's bytes), with mode 0600. A secret file that
group or others can read, or that does not hold exactly 32 bytes, is refused rather than used or replaced.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from tmu_core.errors import CheckpointError, InvalidInputError

logger = logging.getLogger(__name__)

SECRET_BYTES = 32
SECRET_MODE = 0o600


def load_or_create_secret(path: Path) -> bytes:
    """Read the secret at ``path``, creating it (32 random bytes, mode 0600) when the file does not exist.

    Args:
        path: the secret file, e.g. ``<home>/secret.key``; its folder is created when missing.

    Returns:
        The 32 secret bytes, as re-read from the file.

    Raises:
        CheckpointError: the file grants group or others any access, is not a regular file, or does not hold
            exactly 32 bytes.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _create_secret(path)
    return _read_secret(path)


def keyed_id(secret: bytes, value: str) -> str:
    """Hex HMAC-SHA256 of ``value``'s UTF-8 bytes under ``secret``: what records store instead of an id.

    Args:
        secret: the workspace secret (see :func:`load_or_create_secret`).
        value: a sample id, owner id or other identifier.

    Returns:
        64 lowercase hex digits.

    Raises:
        InvalidInputError: ``secret`` is empty (an empty key would make the hash as guessable as a plain one).
    """
    if not secret:
        raise InvalidInputError("keyed_id needs the workspace secret (32 bytes); got an empty key")
    return hmac.new(secret, value.encode("utf-8"), hashlib.sha256).hexdigest()


def _create_secret(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
    try:
        os.fchmod(fd, SECRET_MODE)  # the umask can only narrow O_CREAT's mode; set it exactly
        os.write(fd, secrets.token_bytes(SECRET_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # unlike rename, never replaces a secret another process made meanwhile
        logger.info("created workspace secret %s", path)
    except FileExistsError:
        logger.debug("workspace secret %s was created by another process", path)
    finally:
        tmp.unlink()
    fsync_dir(path.parent)


def _read_secret(path: Path) -> bytes:
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"workspace secret {path} is not a regular file; expected a file of "
                              f"{SECRET_BYTES} random bytes with mode 0600")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise CheckpointError(f"workspace secret {path} has mode {mode:04o}, open to group or others; "
                              f"accepted: 0600 or narrower, owner only (fix it with chmod 600 {path})")
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise CheckpointError(f"workspace secret {path} holds {len(secret)} bytes; "
                              f"a workspace secret is exactly {SECRET_BYTES} random bytes")
    return secret


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a file created or linked in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
