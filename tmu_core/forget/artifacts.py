"""Prepared unlearning state of a model version, under ``version_dir(model, N)/artifacts``.

Preparing is the per-version work a forget request should not pay for (TMU's twin model, curriculum model,
retained features and easy/hard classifier). A job prepares the serving version's state when it is missing; after a
swap the worker prepares the new version's state in the background. An exclusive file lock keeps a request from
reading half-written state while another process prepares it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tmu_core.config import Workspace

logger = logging.getLogger(__name__)

LOCK_NAME = ".artifacts.lock"


@dataclass(frozen=True)
class DataPlan:
    """The id sets a version's unlearning works with.

    Attributes:
        train_ids: live training ids (D_r + D_f), sorted.
        twin_ids: test ids of TMU's twin problem.
        eval_ids: test ids never used by unlearning: ACC_Dtest and the attack's non-members.
    """

    train_ids: tuple[str, ...]
    twin_ids: tuple[str, ...]
    eval_ids: tuple[str, ...]


def plan_data(index: Any, twin_fraction: float, seed: int, train_ids: Any = None) -> DataPlan:
    """The version's training ids (``train_ids``; every live training id when None) and the live test split
    halved (per class, seeded) into twin/eval."""
    from tmu_core.evaluate.splits import split_test

    split = split_test(index, twin_fraction, seed)
    train = tuple(sorted(train_ids)) if train_ids is not None else tuple(index.ids("train"))
    return DataPlan(train, split.twin_ids, split.eval_ids)


def artifacts_dir(workspace: Workspace, model: str, version: int) -> Path:
    """``<home>/models/<model>/v<N>/artifacts``."""
    return workspace.version_dir(model, version) / "artifacts"


@contextlib.contextmanager
def artifacts_lock(folder: Path, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the block.

    Raises:
        BlockingIOError: ``blocking`` is False and another process holds the lock.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare(method: Any, model: torch.nn.Module, meta: Any, index: Any, plan: DataPlan, device: torch.device,
            folder: Path, parent: Any = None, origin: str | None = None) -> float:
    """Run ``method.prepare`` for a version with nothing to forget yet, under the folder's lock.

    The method reuses what is already on disk when it matches (same weights, ids and options): a second process
    that asks for a version another one is preparing waits on the lock, then reads the files it wrote.
    With ``parent`` (the in-memory prepared state of the version ``model`` was unlearned from) a method that
    has ``prepare_from`` updates that state instead of building from scratch; ``origin`` names that version.

    Returns:
        Seconds spent (including the wait for the lock).
    """
    from tmu_core.unlearn import UnlearnData

    started = time.perf_counter()
    data = UnlearnData(index, (), plan.train_ids, plan.twin_ids)
    with artifacts_lock(folder):
        if parent is not None and hasattr(method, "prepare_from"):
            method.prepare_from(parent, model, meta, data, device, folder, origin)
        else:
            method.prepare(model, meta, data, device, folder)
    seconds = time.perf_counter() - started
    logger.info("prepared %s artifacts in %s (%.1fs)", getattr(method, "name", "?"), folder, seconds)
    return seconds


def prepare_version(workspace: Workspace, model: str, version: int | None = None, method: str = "tmu",
                    options: dict[str, Any] | None = None, device: str = "auto", twin_fraction: float = 0.5,
                    seed: int = 0) -> float:
    """Prepare a registered version's artifacts ahead of forget requests (the serving version by default).

    A forget job prepares them itself when they are missing; doing it ahead takes that cost off the first request.
    ``twin_fraction`` and ``seed`` must match the jobs' ``PipelineConfig`` (the defaults do).

    Returns:
        Seconds spent.

    Raises:
        ModelNotFoundError: unknown model or version. InvalidInputError: unknown method or option.
    """
    from tmu_core.device import resolve_device
    from tmu_core.index import TrainingIndex
    from tmu_core.preprocess import Preprocess
    from tmu_core.state.versions import VersionRegistry
    from tmu_core.train import load_checkpoint
    from tmu_core.unlearn import get_method

    registry = VersionRegistry(workspace.state_db)
    record = registry.require_serving(model) if version is None else registry.get(model, version)
    chosen = get_method(method, **(options or {}))
    target = resolve_device(device)
    net, meta = load_checkpoint(record.checkpoint, target)
    with TrainingIndex.open(workspace.index_dir) as index:
        plan = plan_data(index, twin_fraction, seed, registry.members(model, record.version))
        view = index.view(Preprocess.from_meta(meta))  # images as the version's handler reads them
        return prepare(chosen, net, meta, view, plan, target, artifacts_dir(workspace, model, record.version))
