"""Batched inference helpers shared by training, unlearning and evaluation, and the training loops' pause point.

The inference helpers take uint8 images (N, C, H, W), move one batch at a time to ``device``, run the model under
``eval()`` and ``torch.inference_mode()``, return CPU tensors and leave the model in the mode it was in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
from torch import nn

from tmu_core.device import cpu_layout
from tmu_core.errors import InvalidInputError

_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
_PAUSE: ContextVar[Callable[[], None] | None] = ContextVar("tmu_training_pause", default=None)


@contextlib.contextmanager
def yielding(wait: Callable[[], None]) -> Iterator[None]:
    """Inside the block every training step first calls ``wait``, which may sleep: how a low-priority training
    (an exact retrain) leaves the CPU to forget jobs. The loops of ``fit``, ``fit_rows`` and ``train_epochs``
    call it through :func:`pause_point`."""
    token = _PAUSE.set(wait)
    try:
        yield
    finally:
        _PAUSE.reset(token)


def pause_point() -> None:
    """Where a training loop lets a low-priority training wait (see :func:`yielding`); free otherwise."""
    wait = _PAUSE.get()
    if wait is not None:
        wait()


def check_images(images_u8: torch.Tensor, name: str = "images") -> None:
    """Raise unless ``images_u8`` is a uint8 tensor of shape (N, C, H, W).

    Raises:
        InvalidInputError: wrong type, dtype or number of dimensions.
    """
    if not isinstance(images_u8, torch.Tensor):
        raise InvalidInputError(f"{name}: expected a uint8 tensor (N, C, H, W), got {type(images_u8).__name__}")
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
        raise InvalidInputError(
            f"{name}: expected a uint8 tensor (N, C, H, W), got {images_u8.dtype} of shape {tuple(images_u8.shape)}"
        )


def check_labels(labels: torch.Tensor, count: int, name: str = "labels") -> None:
    """Raise unless ``labels`` is an integer tensor of shape (count,).

    Raises:
        InvalidInputError: wrong dtype, shape or length.
    """
    if not isinstance(labels, torch.Tensor) or labels.dtype not in _LABEL_DTYPES:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InvalidInputError(f"{name}: expected an integer tensor (N,), got {got}")
    if labels.dim() != 1 or labels.shape[0] != count:
        raise InvalidInputError(f"{name}: expected shape ({count},) to match the images, got {tuple(labels.shape)}")


def to_float(images_u8: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1] on ``device``; on the CPU in channels-last memory order
    (:func:`tmu_core.device.cpu_layout`, applied to the uint8 batch: ``float()`` keeps the order)."""
    check_images(images_u8)
    return cpu_layout(images_u8.to(device, non_blocking=True)).float().div_(255.0)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous train/eval mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _map_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, images_u8: torch.Tensor,
    device: torch.device | str, batch_size: int,
) -> torch.Tensor:
    check_images(images_u8)
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    outputs = []
    # An empty input still runs once, so the result has the right width: (0, K) or (0, D).
    starts = range(0, images_u8.shape[0], batch_size) if images_u8.shape[0] else [0]
    with eval_mode(model), torch.inference_mode():
        for start in starts:
            x01 = to_float(images_u8[start:start + batch_size], device)
            outputs.append(fn(x01).float().cpu())
    return torch.cat(outputs)


def predict_logits(
    model: nn.Module, images_u8: torch.Tensor, device: torch.device | str, batch_size: int = 512
) -> torch.Tensor:
    """Logits (N, K) on the CPU for uint8 images (N, C, H, W)."""
    return _map_batches(model, model, images_u8, device, batch_size)


def extract_features(
    model: nn.Module, images_u8: torch.Tensor, device: torch.device | str, batch_size: int = 512
) -> torch.Tensor:
    """Penultimate activations ``model.features(x)`` (N, D) on the CPU for uint8 images (N, C, H, W)."""
    return _map_batches(model.features, model, images_u8, device, batch_size)


def accuracy(
    model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, device: torch.device | str,
    batch_size: int = 512,
) -> float:
    """Top-1 accuracy in percent.

    Raises:
        InvalidInputError: empty set, or labels that do not match the images.
    """
    check_images(images_u8)
    check_labels(labels, images_u8.shape[0])
    if images_u8.shape[0] == 0:
        raise InvalidInputError("accuracy of an empty set is undefined; pass at least one image")
    preds = predict_logits(model, images_u8, device, batch_size).argmax(dim=1)
    return 100.0 * (preds == labels.cpu().long()).float().mean().item()
