"""``StateStore``: the one object that owns the state database of a workspace and its transactions."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from tmu_core.config import Workspace
from tmu_core.state.audit import AuditLog
from tmu_core.state.db import write_tx
from tmu_core.state.jobs import JobStore
from tmu_core.state.requests import RequestStore
from tmu_core.state.versions import VersionRegistry


class StateStore:
    """Versions (with their training membership), forget requests and jobs, and the audit log, in one file.

    Each table keeps its own class; this object opens them all on one path and hands out write transactions
    that span them, so that a version, its membership, the audit record and the job's outcome commit together.

    Args:
        path: the SQLite file (``workspace.state_db``); tables are created on first use.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.versions = VersionRegistry(self.path)
        self.membership = self.versions.membership
        self.jobs = JobStore(self.path)
        self.requests = RequestStore(self.path)
        self.audit = AuditLog(self.path)

    @classmethod
    def open(cls, workspace: Workspace) -> "StateStore":
        """The state store of ``workspace``."""
        return cls(workspace.state_db)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction over every table: committed when the block ends, rolled back if it raises."""
        with write_tx(self.path) as conn:
            yield conn
