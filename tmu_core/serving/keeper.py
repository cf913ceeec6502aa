"""Renew the keys of a workspace's TorchServe before they expire, from a background thread.

The management extension runs one :class:`KeyKeeper` for as long as it runs::

    keeper = KeyKeeper(workspace).start()
    ...
    keeper.stop()

Each pass re-reads ``<serve_dir>/config.properties`` and ``key_file.json``, so the keeper follows a TorchServe
that was restarted on other ports, and waits quietly while none runs. A key is renewed once less than
``lead`` of its life is left, where ``lead`` is half its lifetime, at most ``max_lead_s``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from tmu_core.config import Workspace
from tmu_core.errors import InvalidInputError, TmuError
from tmu_core.serving.keys import read_keys, renew_key
from tmu_core.serving.torchserve import KEY_FILE, TorchServeConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenewalSettings:
    """When keys are renewed.

    Attributes:
        max_lead_s: renew a key at most this long before it expires (and at half its lifetime when shorter).
        max_poll_s: the longest pause between two checks (a sixth of the lifetime when shorter).
        timeout_s: seconds for one renewal request.
    """

    max_lead_s: float = 300.0
    max_poll_s: float = 30.0
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_lead_s", "max_poll_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")

    def lead(self, lifetime_s: float) -> timedelta:
        """How long before expiry a key of ``lifetime_s`` seconds is renewed."""
        return timedelta(seconds=min(self.max_lead_s, lifetime_s / 2))

    def poll_s(self, lifetime_s: float) -> float:
        """Seconds between two checks, for keys of ``lifetime_s`` seconds."""
        return min(self.max_poll_s, lifetime_s / 6)


class KeyKeeper:
    """Keeps the management and inference keys of ``workspace``'s TorchServe valid, from a daemon thread.

    Args:
        workspace: whose ``serve_dir`` holds TorchServe's ``config.properties`` and ``key_file.json``.
        settings: lead time, poll interval, request timeout.
    """

    def __init__(self, workspace: Workspace, settings: RenewalSettings | None = None) -> None:
        self.workspace = workspace
        self.settings = settings or RenewalSettings()
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, now: datetime | None = None) -> tuple[str, ...]:
        """One pass: renew each key that is due; nothing when no TorchServe with token auth runs here.

        Returns:
            The kinds renewed.

        Raises:
            AuthError / ServerError: a due key could not be renewed (the message says why and what to do).
        """
        config = self._config()
        if config is None:
            return ()
        keys = read_keys(self.workspace.serve_dir / KEY_FILE)
        due = keys.due(now or datetime.now(timezone.utc), self.settings.lead(config.token_expiration_min * 60))
        for kind in due:
            keys = renew_key(config.url("management"), keys, kind, self.settings.timeout_s)
        return due

    def _config(self) -> TorchServeConfig | None:
        """The running server's config when it uses token auth and has written its key file, else None."""
        config_path = self.workspace.serve_dir / "config.properties"
        if not config_path.is_file() or not (self.workspace.serve_dir / KEY_FILE).is_file():
            return None
        config = TorchServeConfig.from_properties(config_path, self.workspace.model_store)
        return config if config.token_auth else None

    def start(self) -> "KeyKeeper":
        """Start the thread (once) and return self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tmu-key-keeper", daemon=True)
            self._thread.start()
            logger.info("key keeper started serve_dir=%s", self.workspace.serve_dir)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to stop and wait up to ``timeout`` seconds for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
            logger.info("key keeper stopped serve_dir=%s", self.workspace.serve_dir)

    def _run(self) -> None:
        while not self._stop.is_set():
            pause = self.settings.max_poll_s
            try:
                config = self._config()
                if config is not None:
                    pause = self.settings.poll_s(config.token_expiration_min * 60)
                    self.check()
            except TmuError as err:
                # Keep trying: the next pass may succeed, and a client renews an expired key itself.
                self.failures += 1
                pause = min(pause, 5.0)
                logger.error("cannot renew the TorchServe keys of %s: %s; retrying in %.0f s",
                             self.workspace.serve_dir, err, pause)
            self._stop.wait(pause)


__all__ = ["KeyKeeper", "RenewalSettings"]
