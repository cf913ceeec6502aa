"""Recording a packaged version in the registry together with the training samples it was trained on.

A forget request reaches every model trained on its samples, so every version must say which samples those
are. A checkpoint records the fingerprint of its training ids (``meta.index_fingerprint``); the ids themselves
come from a manifest (``--trained-on``, one sample id per line) or, when the checkpoint was trained on the
index's whole training split, from the index. Either way they must match the fingerprint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tmu_core.config import Workspace
from tmu_core.errors import InvalidInputError
from tmu_core.serving.archive import PackageResult
from tmu_core.state.versions import VersionRecord, VersionRegistry

logger = logging.getLogger(__name__)


def read_manifest(path: Path) -> list[str]:
    """Sample ids from a manifest file: one per line, blank lines and ``#`` comments ignored.

    Raises:
        InvalidInputError: the file cannot be read or names no id.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"cannot read the sample-id manifest {path}: {err}") from err
    ids = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise InvalidInputError(f"the manifest {path} names no sample id; expected one training sample id a line")
    return ids


def training_ids(workspace: Workspace, checkpoint: Path, trained_on: list[str] | None = None) -> list[str] | None:
    """The ids ``checkpoint`` was trained on: ``trained_on`` if given, else the index's training split, checked
    against the checkpoint's recorded fingerprint. None when the workspace has no index and no ids were given:
    the version then counts as trained on every training sample an index will hold (the safe reading).

    Raises:
        InvalidInputError: the ids do not match the fingerprint (the message says how to fix it), or name
            samples the index does not hold.
    """
    from tmu_core.index import TrainingIndex
    from tmu_core.index.forget import ids_fingerprint
    from tmu_core.train import load_checkpoint

    _, meta = load_checkpoint(checkpoint, "cpu")
    if trained_on is None and not (workspace.index_dir / "index.sqlite").is_file():
        logger.warning("no training index at %s: %s is recorded as trained on every training sample",
                       workspace.index_dir, checkpoint)
        return None
    with TrainingIndex.open(workspace.index_dir) as index:
        ids = sorted(set(trained_on)) if trained_on is not None else index.ids("train")
        if trained_on is not None:
            index.lookup(ids)  # every id must be a live sample (UnknownIdsError lists the others)
    if meta.index_fingerprint and ids_fingerprint(ids) != meta.index_fingerprint:
        source = "the manifest" if trained_on is not None else "the index's current training split"
        raise InvalidInputError(
            f"{source} ({len(ids)} ids) is not what {checkpoint} was trained on ({meta.train_size} samples, "
            f"fingerprint {meta.index_fingerprint[:12]}...); pass --trained-on with the exact training ids")
    return ids


def record_package(workspace: Workspace, result: PackageResult, members: list[str] | None) -> VersionRecord:
    """Record a packaged version: ``serving`` if the model has none yet, else ``superseded`` (it waits for a
    rollback to it), with its training membership."""
    registry = VersionRegistry(workspace.state_db)
    state = "serving" if registry.serving(result.model) is None else "superseded"
    return registry.record_version(result.model, result.version, result.archive, result.checkpoint, result.onnx,
                                   parent=None, forget_request=None,
                                   metrics={"onnx_max_abs_diff": result.onnx_check.max_abs_diff}, state=state,
                                   members=members)
