"""TorchServe 0.12's token keys: read ``key_file.json``, decide when a key is due, renew it, hand it to clients.

TorchServe writes ``key_file.json`` at start: a management key and an inference key, each with an
``"expiration time"`` (a Java ``Instant``, ``token_expiration_min`` after it was made), and an API key that never
expires. ``POST /token?type=management|inference`` on the management port, sent with the API key, replaces that
key by a new one with a new expiration time and rewrites the whole file; the old key is refused from then on
(HTTP 400 ``InvalidKeyException``). Nothing renews the keys by itself: :class:`tmu_core.serving.keeper.KeyKeeper`
does it before they expire, and a :class:`KeyRing` lets a client pick up a renewed key, or renew an expired one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from tmu_core.errors import AuthError, InvalidInputError, ServerError

logger = logging.getLogger(__name__)

KINDS = ("management", "inference")
# Java writes the file with truncate-then-write: a reader can catch it empty or half written.
_READ_TRIES = 10
_READ_PAUSE_S = 0.05


def parse_instant(text: str) -> datetime:
    """A Java ``Instant`` string (``2024-02-16T21:12:24.801167Z``, up to 9 fraction digits) as an aware UTC time.

    Raises:
        InvalidInputError: ``text`` is not an ISO-8601 UTC time.
    """
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"expected an ISO-8601 UTC time like 2024-02-16T21:12:24.801167Z, "
                                f"got {text!r}") from err
    if when.tzinfo is None:
        raise InvalidInputError(f"expected an ISO-8601 UTC time ending in Z, got {text!r} without a time zone")
    return when.astimezone(timezone.utc)


@dataclass(frozen=True)
class TokenKeys:
    """The keys of ``key_file.json``: send ``Authorization: Bearer <key>``.

    Attributes:
        management / inference / api: the keys.
        path: the key file they were read from.
        management_expires / inference_expires: when TorchServe stops accepting each key (None: not given).
    """

    management: str
    inference: str
    api: str
    path: Path
    management_expires: datetime | None = None
    inference_expires: datetime | None = None

    def key(self, kind: str) -> str:
        """The ``"management"`` or ``"inference"`` key."""
        return getattr(self, _checked(kind))

    def expires(self, kind: str) -> datetime | None:
        """When the ``"management"`` or ``"inference"`` key expires."""
        return getattr(self, f"{_checked(kind)}_expires")

    def due(self, now: datetime, lead: timedelta = timedelta(0)) -> tuple[str, ...]:
        """The kinds whose key expires before ``now + lead`` (already expired ones included)."""
        return tuple(kind for kind in KINDS if (when := self.expires(kind)) is not None and when <= now + lead)


def _checked(kind: str) -> str:
    if kind not in KINDS:
        raise InvalidInputError(f"token kind must be one of {list(KINDS)}, got {kind!r}")
    return kind


def parse_keys(text: str, path: Path) -> TokenKeys:
    """Parse the text of ``key_file.json``.

    Raises:
        ServerError: not JSON, or a key or expiration time is missing or malformed.
    """
    try:
        data = json.loads(text)
        return TokenKeys(management=data["management"]["key"], inference=data["inference"]["key"],
                         api=data["API"]["key"], path=path,
                         management_expires=parse_instant(data["management"]["expiration time"]),
                         inference_expires=parse_instant(data["inference"]["expiration time"]))
    except (json.JSONDecodeError, KeyError, TypeError, InvalidInputError) as err:
        raise ServerError(f"cannot read TorchServe keys from {path}: expected management, inference and API keys "
                          f"with expiration times, got {text[:80]!r} ({type(err).__name__}: {err})") from err


def read_keys(path: Path) -> TokenKeys:
    """Read ``key_file.json``, waiting briefly if TorchServe is rewriting it.

    Raises:
        ServerError: no file (TorchServe is not running there, or token auth is off), or it stays unreadable.
    """
    last: ServerError | None = None
    for attempt in range(_READ_TRIES):
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ServerError(f"cannot read TorchServe keys from {path}: {err.strerror or err}; is TorchServe "
                              "running with token authorization (tmu-admin serve start)?") from err
        try:
            return parse_keys(text, Path(path))
        except ServerError as err:
            last = err
            time.sleep(_READ_PAUSE_S * (attempt + 1))
    raise last  # type: ignore[misc]


def renew_key(management_url: str, keys: TokenKeys, kind: str, timeout: float = 10.0) -> TokenKeys:
    """Have TorchServe replace the ``kind`` key (``POST /token?type=<kind>`` with the API key); read the new file.

    Raises:
        AuthError: TorchServe refused the API key (the key file belongs to another server run).
        ServerError: TorchServe could not be reached, or the key file did not change.
    """
    url = f"{management_url.rstrip('/')}/token"
    what = f"renewing the TorchServe {_checked(kind)} key (POST {url}?type={kind})"
    try:
        resp = requests.post(url, params={"type": kind}, headers={"Authorization": f"Bearer {keys.api}"},
                             timeout=timeout)
    except requests.RequestException as err:
        raise ServerError(f"{what} failed: cannot reach TorchServe ({err}); is it running? "
                          "Start it with tmu-admin serve start") from err
    if resp.status_code == 400:
        raise AuthError(f"{what} failed: TorchServe refused the API key of {keys.path} ({resp.text.strip()[:200]}); "
                        "the key file does not belong to the running server: restart it with "
                        "tmu-admin serve stop && tmu-admin serve start")
    if resp.status_code != 200:
        raise ServerError(f"{what} failed: TorchServe answered {resp.status_code}: {resp.text.strip()[:200]}")
    renewed = read_keys(keys.path)
    if renewed.key(kind) == keys.key(kind) and renewed.expires(kind) == keys.expires(kind):
        raise ServerError(f"{what}: TorchServe answered 200 but {keys.path} still holds the old key; "
                          "TorchServe may lack write access to it, see its ts_log.log")
    logger.info("renewed torchserve %s key, valid until %s", kind, renewed.expires(kind))
    return renewed


class KeyRing:
    """The key file of one TorchServe, for clients: read afresh for each request, refreshed after a refusal.

    Args:
        path: ``key_file.json``.
        management_url: where ``POST /token`` goes when a key has to be renewed.
        timeout: seconds for a renewal request.
    """

    def __init__(self, path: Path, management_url: str, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.management_url = management_url
        self.timeout = timeout
        self._lock = threading.Lock()

    def token(self, kind: str) -> str:
        """The current ``kind`` key in the file.

        Raises:
            ServerError: the key file cannot be read.
        """
        return read_keys(self.path).key(kind)

    def refresh(self, kind: str, refused: str) -> str:
        """A key to retry with after TorchServe refused ``refused``: the file's newer key, else a renewed one.

        A key the file still holds is renewed when it has expired, or when it stays refused after a short
        wait (TorchServe switches to a new key a moment before it rewrites the file).

        Raises:
            AuthError / ServerError: the key could not be renewed (the message says why and what to do).
        """
        with self._lock:  # one renewal per process: each renewal makes every other copy of the key stale
            keys = read_keys(self.path)
            if keys.key(kind) != refused:
                return keys.key(kind)
            if not keys.due(datetime.now(timezone.utc), timedelta(seconds=1)):
                time.sleep(0.2)
                keys = read_keys(self.path)
                if keys.key(kind) != refused:
                    return keys.key(kind)
            logger.info("torchserve refused the %s key of %s (valid until %s); renewing it", kind, self.path,
                        keys.expires(kind))
            return renew_key(self.management_url, keys, kind, self.timeout).key(kind)
