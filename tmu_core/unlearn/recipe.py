"""The original model's training recipe over a retained set read by rows, for the baselines that train on D_r.

``tmu_core.train.fit`` takes the whole training set as one tensor (and copies it to the GPU); here the same
epochs run over :class:`tmu_core.unlearn.data.LazyImages`, so each step reads only its own batch from the
index and the memory taken does not grow with the retained set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tmu_core.device import generator, set_deterministic
from tmu_core.errors import InvalidInputError

# One epoch loop for training from tensors and from rows: the shuffles, the augmentation stream, the
# optimiser and the schedule are fit's own, so the same images give the same weights.
from tmu_core.train.fit import _AUGMENT_STREAM, _make_optimizer, _train_epoch

logger = logging.getLogger(__name__)


def fit_rows(model: nn.Module, images: Any, labels: torch.Tensor, cfg: Any, device: torch.device | str) -> float:
    """Train ``model`` in place with the recipe ``cfg``, reading ``images`` one batch at a time.

    The weights equal those of ``tmu_core.train.fit(model, tensor_of_the_same_images, labels, cfg, device)``.

    Args:
        model: a classifier taking float images in [0, 1] (moved to ``device``).
        images: (N, C, H, W) uint8 images indexable by a LongTensor of rows (a tensor or ``LazyImages``).
        labels: (N,) int64.
        cfg: a :class:`tmu_core.train.TrainConfig`.
        device: where to train.

    Returns:
        The last epoch's running training accuracy, in percent. The model ends in eval mode.

    Raises:
        InvalidInputError: fewer than two images, or labels of another length.
    """
    device = torch.device(device)
    count = int(images.shape[0])
    if count < 2:
        raise InvalidInputError(f"training needs at least 2 images (batch norm), got {count}")
    if labels.shape != (count,):
        raise InvalidInputError(f"expected {count} labels to match the images, got shape {tuple(labels.shape)}")
    if cfg.deterministic:
        set_deterministic(True)
    labels = labels.long()
    model.to(device)
    optimiser, scheduler = _make_optimizer(model, cfg)
    aug_gen = generator(cfg.seed + _AUGMENT_STREAM)
    accuracy = 0.0
    for epoch in range(cfg.epochs):
        stats = _train_epoch(model, images, labels, cfg, device, epoch, optimiser, aug_gen)
        scheduler.step()
        accuracy = 100.0 * float(stats.correct) / max(stats.seen, 1)
        logger.info("epoch %d/%d train_acc=%.2f samples=%d", epoch + 1, cfg.epochs, accuracy, count)
    model.eval()
    return accuracy


def pixel_stats(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the pixels in [0, 1] over a stream of ``(uint8 images, labels)`` batches.

    The sums are exact integers, so the result does not depend on the batch size. It may differ from
    ``tmu_core.train.channel_stats`` of the whole tensor (float64 sums of x / 255 in chunks of 4,096 images) in
    the last bits of a float64.

    Raises:
        InvalidInputError: no images.
    """
    total = squares = None
    count = 0
    for images, _ in batches:
        wide = images.to(torch.int64)  # (B, C, H, W)
        batch_total, batch_squares = wide.sum(dim=(0, 2, 3)), wide.pow(2).sum(dim=(0, 2, 3))
        total = batch_total if total is None else total + batch_total
        squares = batch_squares if squares is None else squares + batch_squares
        count += int(images.shape[0]) * int(images.shape[2]) * int(images.shape[3])
    if total is None or squares is None or count == 0:
        raise InvalidInputError("cannot compute pixel statistics of zero images")
    mean = total.double() / (255.0 * count)
    std = (squares.double() / (255.0 ** 2 * count) - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())
