"""The training loop (``fit`` over uint8 tensors) and ``train_model`` over the training index."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tmu_core.device import generator, seed_everything, set_deterministic
from tmu_core.errors import InvalidInputError
from tmu_core.models import build_model
from tmu_core.train.augment import crop_flip
from tmu_core.preprocess import Preprocess
from tmu_core.train.checkpoint import CheckpointMeta
from tmu_core.train.config import TrainConfig, TrainHistory, TrainResult
from tmu_core.train.loops import accuracy, check_images, check_labels, pause_point, to_float

if TYPE_CHECKING:
    from tmu_core.index import TrainingIndex

logger = logging.getLogger(__name__)

# Offset that keeps the augmentation stream apart from the shuffle streams (seed + epoch).
_AUGMENT_STREAM = 1_000_003


@dataclass
class _EpochStats:
    # Sums stay tensors on the device during the epoch, so no step waits for a host sync.
    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    seen: int = 0


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _make_optimizer(
    model: nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestone_epochs(), gamma=cfg.gamma)
    return optimizer, scheduler


def _train_epoch(
    model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, device: torch.device,
    epoch: int, optimizer: torch.optim.Optimizer, aug_gen: torch.Generator,
) -> _EpochStats:
    """One pass in a seeded order; a trailing batch of one image is skipped (batch norm needs two)."""
    order = torch.randperm(images_u8.shape[0], generator=generator(cfg.seed + epoch)).to(images_u8.device)
    padding = cfg.crop_padding or max(1, images_u8.shape[-1] // 8)
    stats = _EpochStats()
    model.train()
    for start in range(0, order.numel(), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        if idx.numel() < 2:
            continue
        pause_point()
        x01 = to_float(images_u8[idx], device)
        if cfg.augment:
            x01 = crop_flip(x01, padding, aug_gen)
        targets = labels[idx].to(device, non_blocking=True)
        with _autocast(device, cfg.amp):
            logits = model(x01)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats.loss_sum += loss.detach() * idx.numel()
        stats.correct += (logits.detach().argmax(1) == targets).sum()
        stats.seen += idx.numel()
    return stats


def fit(
    model: nn.Module,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device | str,
    progress: bool = False,
    eval_images: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
) -> TrainHistory:
    """Train ``model`` in place with SGD + step schedule (+ crop/flip when ``cfg.augment``).

    The model is moved to ``device``. On CUDA the uint8 images are copied to the GPU once; elsewhere
    they stay where they are and travel one batch at a time.
    Epoch ``e`` shuffles with ``generator(cfg.seed + e)``; augmentation has its own seeded generator.
    The model's initial weights are the caller's business (``train_model`` seeds them).

    Args:
        model: a classifier taking float images in [0, 1].
        images_u8: training images, uint8 (N, C, H, W), N >= 2.
        labels: class indices (N,).
        cfg: the recipe.
        device: where to train.
        progress: show a tqdm bar over the epochs (on stderr).
        eval_images: optional uint8 images scored after every epoch.
        eval_labels: their labels.

    Returns:
        Per-epoch loss, running train accuracy, eval accuracy and learning rate. The model ends in eval mode.

    Raises:
        InvalidInputError: malformed images or labels, or fewer than two training images.
    """
    device = torch.device(device)
    _check_fit_inputs(images_u8, labels, eval_images, eval_labels)
    if cfg.deterministic:
        set_deterministic(True)
    labels = labels.long()
    if device.type == "cuda":
        # Small-image data sets fit in GPU memory (50,000 CIFAR images are 150 MB): copy them once.
        images_u8, labels = images_u8.to(device), labels.to(device)
    model.to(device)
    optimizer, scheduler = _make_optimizer(model, cfg)
    aug_gen = generator(cfg.seed + _AUGMENT_STREAM)
    losses, train_accs, eval_accs, lrs = [], [], [], []
    started = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        lrs.append(optimizer.param_groups[0]["lr"])
        stats = _train_epoch(model, images_u8, labels, cfg, device, epoch, optimizer, aug_gen)
        scheduler.step()
        losses.append(float(stats.loss_sum) / max(stats.seen, 1))
        train_accs.append(100.0 * float(stats.correct) / max(stats.seen, 1))
        if eval_images is not None and eval_labels is not None:
            eval_accs.append(accuracy(model, eval_images, eval_labels, device))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{train_accs[-1]:.1f}")
        logger.info("epoch %d/%d loss=%.4f train_acc=%.2f eval_acc=%s lr=%.5f", epoch + 1, cfg.epochs,
                    losses[-1], train_accs[-1], f"{eval_accs[-1]:.2f}" if eval_accs else "-", lrs[-1])
    model.eval()
    return TrainHistory(tuple(losses), tuple(train_accs), tuple(eval_accs), tuple(lrs), time.perf_counter() - started)


def _check_fit_inputs(
    images_u8: torch.Tensor, labels: torch.Tensor, eval_images: torch.Tensor | None, eval_labels: torch.Tensor | None
) -> None:
    check_images(images_u8, "training images")
    check_labels(labels, images_u8.shape[0], "training labels")
    if images_u8.shape[0] < 2:
        raise InvalidInputError(f"training needs at least 2 images (batch norm), got {images_u8.shape[0]}")
    if (eval_images is None) != (eval_labels is None):
        raise InvalidInputError("pass both eval_images and eval_labels, or neither")
    if eval_images is not None and eval_labels is not None:
        check_images(eval_images, "eval images")
        check_labels(eval_labels, eval_images.shape[0], "eval labels")


def channel_stats(images_u8: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the pixels in [0, 1], computed in float64 chunks.

    Raises:
        InvalidInputError: malformed or empty images.
    """
    check_images(images_u8)
    if images_u8.shape[0] == 0:
        raise InvalidInputError("cannot compute pixel statistics of zero images")
    channels = images_u8.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images_u8.shape[0], chunk):
        x = images_u8[start:start + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.pow(2).sum(dim=(0, 2, 3))
    count = images_u8.shape[0] * images_u8.shape[2] * images_u8.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def train_model(
    index: "TrainingIndex",
    sample_ids: Sequence[str],
    arch: str,
    cfg: TrainConfig,
    device: torch.device | str,
    parent: str | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train a fresh ``arch`` model on ``sample_ids`` of the training index.

    Seeds everything with ``cfg.seed`` before building the model, takes the normalisation from the
    training pixels and records the recipe, the index fingerprint of the ids and the train size.

    Args:
        index: an open ``TrainingIndex``, or an ``IndexView`` of one (its preprocessing is then the model's and
            is recorded in the meta; an index of mixed sizes needs one).
        sample_ids: the ids to train on (e.g. ``index.retained_ids()``).
        arch: a registered architecture name.
        cfg: the recipe.
        device: where to train.
        parent: recorded in the meta (what this model derives from), if anything.
        progress: show a tqdm bar.

    Returns:
        ``TrainResult(model, meta, history)``; the model is in eval mode on ``device``.

    Raises:
        InvalidInputError: bad arch, non-square images, or fewer than two ids.
        UnknownIdsError: ids the index does not hold.
    """
    if not isinstance(arch, str):
        raise InvalidInputError(
            f"train_model(index, sample_ids, arch, cfg, device): arch must be a model name, got {type(arch).__name__}"
        )
    ids = list(sample_ids)
    if index.image_shape is None:
        raise InvalidInputError("the index holds images of mixed sizes; train through a preprocessing that makes "
                                "them one size: index.view(Preprocess(size=..., resize=...))")
    channels, height, width = index.image_shape
    if height != width:
        raise InvalidInputError(f"models take square images; the index holds {height}x{width}")
    preprocess = getattr(index, "preprocess", None) or Preprocess(size=height, channels=channels)
    images_u8, labels = index.load(ids), index.labels(ids)
    mean, std = channel_stats(images_u8)
    seed_everything(cfg.seed)
    model = build_model(arch, len(index.classes), channels, height, mean, std)
    logger.info("training arch=%s samples=%d epochs=%d seed=%d device=%s", arch, len(ids), cfg.epochs, cfg.seed, device)
    history = fit(model, images_u8, labels, cfg, device, progress=progress)
    meta = CheckpointMeta(
        arch=arch, num_classes=len(index.classes), class_names=tuple(index.classes), in_channels=channels,
        image_size=height, mean=mean, std=std, seed=cfg.seed, recipe=asdict(cfg),
        index_fingerprint=index.fingerprint(ids), train_size=len(ids), parent=parent,
        preprocess=preprocess.to_dict(),
    )
    return TrainResult(model=model, meta=meta, history=history)
