"""On-disk cache of evaluation indexes and trained models, so reruns and other protocols reuse them.

Layout under the cache folder::

    index/<source key>/            a training index built from the protocol's data source
    index/<source key>-wide/       every test image of a zip source (``wide_test``), one training image a class
    models/<model key>.pt          checkpoint of a trained original / gold / floor model
    models/<model key>.json        how long it took to train and its training history

A model key hashes the architecture, the training recipe (seed included), the data source key and the
index fingerprint of the training ids, so a cached model is reused only for exactly the same training run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tmu_core.errors import CheckpointError, InvalidInputError
from tmu_core.evaluate.protocols import DataSource
from tmu_core.index import TrainingIndex, ingest_digits, ingest_zip
from tmu_core.train import CheckpointMeta, TrainConfig, load_checkpoint, save_checkpoint, train_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedModel:
    """A trained model and where it came from.

    Attributes:
        model: the model, in eval mode on the run's device.
        meta: its checkpoint metadata.
        seconds: wall time of the training (as first measured, also when read from the cache).
        cached: whether it was read from the cache.
        path: the cached checkpoint.
        key: the cache key.
    """

    model: torch.nn.Module
    meta: CheckpointMeta
    seconds: float
    cached: bool
    path: Path
    key: str


def open_index(source: DataSource, cache_dir: Path) -> TrainingIndex:
    """Open the cached index of ``source``, building it first when missing.

    Args:
        source: the protocol's data source.
        cache_dir: the cache folder.

    Returns:
        The open index (read-only use: the evaluation never forgets from it).

    Raises:
        InvalidInputError: the source cannot be read.
    """
    dest = cache_dir / "index" / source.key()
    try:
        return TrainingIndex.open(dest)
    except CheckpointError:
        logger.info("building evaluation index kind=%s at %s", source.kind, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.kind == "digits":
        return ingest_digits(dest, overwrite=True)
    if source.path is None or not Path(source.path).is_file():
        raise InvalidInputError(f"data file {source.path} does not exist; pass --data with the CIFAR-10 zip path")
    return ingest_zip(source.path, dest, train_per_class=source.train_per_class,
                      test_per_class=source.test_per_class, overwrite=True)


def open_test_index(zip_path: Path | str, dest: Path) -> TrainingIndex:
    """Open the index at ``dest`` of every test image of a zip (and one training image a class), building it first
    when missing. Its ids are ``"test/<class>/<stem>"``, as in any index of the same zip, so that a twin part can
    be left out by id.

    Raises:
        InvalidInputError: the zip does not exist or cannot be read.
    """
    try:
        return TrainingIndex.open(dest)
    except CheckpointError:
        logger.info("building the index of every test image of %s at %s", zip_path, dest)
    if not Path(zip_path).is_file():
        raise InvalidInputError(f"data file {zip_path} does not exist; pass --data with the CIFAR-10 zip path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return ingest_zip(zip_path, dest, train_per_class=1, overwrite=True)


def open_wide_index(source: DataSource, cache_dir: Path) -> TrainingIndex:
    """:func:`open_test_index` of a ``cifar10-zip`` source, cached as ``index/<source key>-wide``."""
    if source.kind != "cifar10-zip" or source.path is None:
        raise InvalidInputError(f"the wide test set needs the CIFAR-10 zip of a cifar10-zip source; got {source.kind}")
    return open_test_index(source.path, cache_dir / "index" / f"{source.key()}-wide")


def model_key(arch: str, cfg: TrainConfig, source: DataSource, fingerprint: str) -> str:
    """Cache key of one training run (arch, recipe incl. seed, data source, training ids)."""
    parts = [arch, asdict(cfg), source.key(), fingerprint]
    if source.image_size is not None:  # keys of models that read the stored pixels stay as they were
        parts.append([source.image_size, source.resize])
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)


def trained_model(index: Any, ids: Sequence[str], arch: str, cfg: TrainConfig, source: DataSource,
                  cache_dir: Path, device: torch.device, role: str) -> TrainedModel:
    """Load a cached model for this exact training run, or train it and cache it.

    Args:
        index: the index or a :class:`~tmu_core.evaluate.scoring.MemorySource` over it.
        ids: training ids.
        arch: architecture name.
        cfg: recipe, with the seed of this model.
        source: the data source (part of the key).
        cache_dir: the cache folder.
        device: where to train and keep the model.
        role: ``original``, ``gold`` or ``floor`` (for logs and the side file).

    Returns:
        The model and its training time.
    """
    key = model_key(arch, cfg, source, index.fingerprint(list(ids)))
    folder = cache_dir / "models"
    path, info_path = folder / f"{key}.pt", folder / f"{key}.json"
    if path.is_file() and info_path.is_file():
        try:
            model, meta = load_checkpoint(path, device)
            seconds = float(json.loads(info_path.read_text())["seconds"])
            logger.info("cached %s model key=%s seed=%d", role, key, cfg.seed)
            return TrainedModel(model, meta, seconds, True, path, key)
        except (CheckpointError, KeyError, ValueError) as err:
            logger.warning("cached %s model key=%s unreadable (%s); training again", role, key, err)
    logger.info("training %s model key=%s seed=%d samples=%d", role, key, cfg.seed, len(ids))
    result = train_model(index, list(ids), arch, cfg, device)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, result.model, result.meta)
    history = result.history
    _write_json(info_path, {"role": role, "seconds": history.seconds, "seed": cfg.seed,
                            "train_acc": list(history.train_acc), "loss": list(history.loss)})
    return TrainedModel(result.model, result.meta, history.seconds, False, path, key)
