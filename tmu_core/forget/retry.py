"""Retrying a step that may fail for a while (a locked database, a full disk, TorchServe restarting)."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tmu_core.errors import InvalidInputError, ServerError

logger = logging.getLogger(__name__)

T = TypeVar("T")
# What a retry may outlast: SQLite busy/locked/full, an I/O error, TorchServe unreachable or refusing.
TRANSIENT = (sqlite3.OperationalError, OSError, ServerError)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying.

    Attributes:
        attempts: tries in all (>= 1).
        first_delay_s: wait after the first failure; doubled after each further one.
        max_delay_s: the longest single wait.
    """

    attempts: int = 6
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.first_delay_s < 0 or self.max_delay_s < 0:
            raise InvalidInputError(f"retry policy needs attempts >= 1 and delays >= 0, got {self}")


def retry(action: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """Run ``action`` until it succeeds, waiting between tries; re-raise the last error after ``policy.attempts``.

    Only ``TRANSIENT`` errors are retried; any other error is raised at once.
    """
    delay = policy.first_delay_s
    for attempt in range(1, policy.attempts):
        try:
            return action()
        except TRANSIENT as err:
            logger.warning("%s failed (try %d of %d), retrying in %.1fs: %s", what, attempt, policy.attempts,
                           delay, err)
            time.sleep(delay)
            delay = min(policy.max_delay_s, delay * 2)
    return action()
