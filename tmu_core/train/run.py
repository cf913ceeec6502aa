"""One training run end to end: index -> model -> checkpoint, with clean train/test accuracy."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tmu_core.errors import InvalidInputError
from tmu_core.models import count_parameters
from tmu_core.preprocess import Preprocess
from tmu_core.train.checkpoint import save_checkpoint
from tmu_core.train.config import TrainConfig
from tmu_core.train.fit import train_model
from tmu_core.train.loops import accuracy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    """What a training run produced.

    Attributes:
        checkpoint: the checkpoint file written.
        arch: architecture name.
        params: trainable parameters.
        epochs: epochs trained.
        train_set: ``"train"`` (the whole train split) or ``"retained"`` (D_r, the train split minus forgotten samples).
        train_size: training samples.
        test_size: test samples scored.
        train_acc: clean accuracy (percent, eval mode, no augmentation) on the training samples.
        test_acc: accuracy on the test split, or None when the index has no test split.
        seconds: training wall time.
        index_fingerprint: fingerprint of the training ids.
    """

    checkpoint: str
    arch: str
    params: int
    epochs: int
    train_set: str
    train_size: int
    test_size: int
    train_acc: float
    test_acc: float | None
    seconds: float
    index_fingerprint: str


def train_to_checkpoint(
    index_dir: Path,
    arch: str,
    cfg: TrainConfig,
    device: torch.device,
    out: Path,
    retain_only: bool = False,
    progress: bool = False,
    image_size: int | None = None,
    resize: int | None = None,
) -> TrainReport:
    """Train ``arch`` on the index's train split (or D_r), save the checkpoint and score it.

    The train split already excludes forgotten samples (they are tombstoned), so today ``retain_only``
    trains on the same ids; it names the intent (a gold model on D_r) and records ``train_set="retained"``.

    Args:
        index_dir: folder of the training index.
        arch: a registered architecture.
        cfg: the recipe.
        device: where to train.
        out: checkpoint file to write.
        retain_only: train on ``index.retained_ids()``.
        progress: show a tqdm bar.
        image_size: the model's input side: images are read through ``Preprocess(image_size, resize)`` (with the
            index's channels; RGB for a mixed index), recorded in the checkpoint; needed for an index of mixed
            sizes. None trains on the stored pixels.
        resize: the shorter side before the centre crop (None: ``image_size``).

    Raises:
        CheckpointError: no index at ``index_dir``.
        InvalidInputError: bad arch, or fewer than two training samples.
    """
    from tmu_core.index import TrainingIndex  # the index package is only needed here

    with TrainingIndex.open(index_dir) as opened:
        index = opened
        if image_size is not None:
            channels = opened.image_shape[0] if opened.image_shape is not None else 3
            index = opened.view(Preprocess(size=image_size, resize=resize, channels=channels))
        ids = index.retained_ids() if retain_only else index.ids("train")
        if len(ids) < 2:
            raise InvalidInputError(f"index {index_dir} holds {len(ids)} live training sample(s); need at least 2")
        result = train_model(index, ids, arch, cfg, device, progress=progress)
        save_checkpoint(out, result.model, result.meta)
        train_acc = accuracy(result.model, index.load(ids), index.labels(ids), device)
        test_ids = index.ids("test")
        test_acc = accuracy(result.model, index.load(test_ids), index.labels(test_ids), device) if test_ids else None
    logger.info("trained arch=%s train_acc=%.2f test_acc=%s out=%s", arch, train_acc, test_acc, out)
    return TrainReport(
        checkpoint=str(out), arch=arch, params=count_parameters(result.model), epochs=cfg.epochs,
        train_set="retained" if retain_only else "train", train_size=len(ids), test_size=len(test_ids),
        train_acc=train_acc, test_acc=test_acc, seconds=result.history.seconds,
        index_fingerprint=result.meta.index_fingerprint,
    )
