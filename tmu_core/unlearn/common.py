"""Tensor helpers shared by the unlearning methods: batched inference, short SGD runs, hashing, fresh models.

Images are uint8 (N, C, H, W) on any device; models take floats in [0, 1] and normalise inside.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tmu_core.device import generator
from tmu_core.errors import InvalidInputError
from tmu_core.train.loops import eval_mode, pause_point, to_float

if TYPE_CHECKING:
    from tmu_core.unlearn.data import LazyImages, UnlearnData

logger = logging.getLogger(__name__)


# Shared with the trainer: uint8 -> [0, 1] floats on a device, and a mode-restoring eval block.
as_input = to_float


# The batch-size rule for every pass over images here (inference, PGD, reads from the index): ``base`` images
# of 32x32 pixels, fewer for larger inputs. Activation memory follows the pixel count H x W (the first layer
# maps any channel count to its own width), so the budget is in pixels: 256 x 32 x 32 = 262,144 per batch.
BASE_SIDE = 32
MIN_BATCH = 8


def batch_for(image_shape: Sequence[int], base: int = 256) -> int:
    """Images per batch for images of ``image_shape`` (``(..., H, W)``).

    ``base`` at 32x32 pixels or fewer, scaled down with the pixel count (at least ``MIN_BATCH``), so that a
    224x224 batch's activations take about the memory of a 32x32 one's: 256 at 32x32, 64 at 64x64, 8 at 224x224.
    """
    pixels = int(image_shape[-1]) * int(image_shape[-2]) if len(image_shape) >= 2 else BASE_SIDE ** 2
    return max(MIN_BATCH, min(base, base * BASE_SIDE ** 2 // max(1, pixels)))


def inference_batch(images: torch.Tensor, base: int = 256) -> int:
    """:func:`batch_for` of a uint8 image tensor (N, C, H, W)."""
    return batch_for(tuple(images.shape), base)


def batched(model_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device,
            batch_size: int | None = None) -> torch.Tensor:
    """Apply ``model_fn`` to [0, 1] inputs batch by batch under inference mode; results gathered on ``device``.

    ``batch_size`` None follows the input size (:func:`inference_batch`).
    """
    batch_size = batch_size or inference_batch(images)
    outputs = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            outputs.append(model_fn(as_input(images[start:start + batch_size], device)))
    return torch.cat(outputs) if outputs else torch.empty(0, device=device)


def logits_of(model: nn.Module, images: torch.Tensor, device: torch.device,
              batch_size: int | None = None) -> torch.Tensor:
    """(N, K) logits of uint8 images, model in eval mode."""
    with eval_mode(model):
        return batched(model, images, device, batch_size)


def features_of(model: nn.Module, images: torch.Tensor, device: torch.device,
                batch_size: int | None = None) -> torch.Tensor:
    """(N, D) penultimate-layer activations (``model.features``) of uint8 images, model in eval mode."""
    with eval_mode(model):
        return batched(model.features, images, device, batch_size)


def features_over(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int,
                  device: torch.device) -> torch.Tensor:
    """(N, D) penultimate features of a stream of ``(uint8 images, labels)`` batches, gathered on the CPU.

    Only one batch of images is in memory at a time; with the batches of :func:`inference_batch` the values
    equal :func:`features_of` of the whole set. The result is written into one (``count``, D) tensor made
    at the first batch: keeping a small tensor per batch alive between the batches' large, short-lived
    activations fragmented the CPU heap (resident memory grew by about 350 MB a pass over 50,000 images).

    Raises:
        InvalidInputError: the batches hold more or fewer than ``count`` images.
    """
    out: torch.Tensor | None = None
    start = 0
    with eval_mode(model), torch.inference_mode():
        for images, _ in batches:
            feats = model.features(as_input(images, device))  # (B, D)
            if out is None:
                out = torch.empty(count, feats.shape[1], dtype=feats.dtype)
            if start + feats.shape[0] > count:
                raise InvalidInputError(f"features_over: the batches hold more than the {count} images announced")
            out[start:start + feats.shape[0]] = feats
            start += feats.shape[0]
    if start != count:
        raise InvalidInputError(f"features_over: the batches held {start} images, not the {count} announced")
    return out if out is not None else torch.empty(0, 0)


def losses_of(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N,) per-sample cross-entropy, model in eval mode."""
    logits = logits_of(model, images, device)
    return F.cross_entropy(logits, labels.to(device), reduction="none")


def correct_of(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N,) bool: the model's arg-max equals the label."""
    return logits_of(model, images, device).argmax(dim=1) == labels.to(device)


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    """The SGD optimiser every method here uses."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of one shuffled epoch over ``n`` samples (the last batch may be smaller)."""
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def paired_steps(model: nn.Module, data: UnlearnData, *, epochs: int, forget_batch: int, retain_batch: int,
                 gen: torch.Generator, device: torch.device,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The forward passes of ``epochs`` shuffled passes over D_f, each D_f batch with a random D_r batch.

    The D_r rows are drawn with replacement (``retain_batch`` a step) and read one batch at a time, so the cost
    and the memory follow |D_f|, not |D_r|. Both batches go through ``model`` in one forward pass (batch norm
    normalises them together), which also serves a D_f batch of one image, refused by batch norm in train mode
    on its own. The caller takes the optimiser step between two items.

    Yields:
        ``(forget_logits, forget_rows, retain_logits, retain_labels)``: the rows index ``data.tensors("forget")``;
        the logits and the retained labels are on ``device``.

    Raises:
        InvalidInputError: D_f or D_r is empty.
    """
    forget_images, _ = data.tensors("forget")
    retain_ids = data.nonempty("retain")
    retain_images, retain_labels = data.rows(retain_ids), data.labels_of(retain_ids)
    for _ in range(epochs):
        for forget_rows in epoch_batches(forget_images.shape[0], forget_batch, gen):
            retain_rows = torch.randint(0, retain_images.shape[0], (retain_batch,), generator=gen)
            images = torch.cat([forget_images[forget_rows], retain_images[retain_rows]])
            logits = model(as_input(images, device))
            count = int(forget_rows.numel())
            yield logits[:count], forget_rows, logits[count:], retain_labels[retain_rows].to(device)


def train_epochs(model: nn.Module, images: torch.Tensor | LazyImages, labels: torch.Tensor, *, epochs: int, lr: float,
                 batch_size: int, seed: int, device: torch.device, weight_decay: float = 5e-4,
                 stop_at_accuracy: float | None = None,
                 until: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Plain cross-entropy SGD (momentum 0.9) over uint8 images, model in train mode.

    Args:
        model: trained in place.
        images: (N, C, H, W) uint8: a tensor, or :class:`LazyImages` (each step reads only its own batch).
        labels: (N,) int64.
        epochs: most epochs to run.
        lr: constant learning rate.
        batch_size: samples per step.
        seed: seeds the shuffles.
        device: where to compute.
        weight_decay: L2 penalty.
        stop_at_accuracy: stop after an epoch whose running training accuracy reaches this fraction.
        until: called after each epoch (model in eval mode); training stops when it returns True.

    Returns:
        ``{"epochs": run, "steps": n, "train_accuracy": last epoch's running accuracy}``.
    """
    gen = generator(seed)
    optimiser = sgd(model, lr, weight_decay=weight_decay)
    model.train()
    steps, run, acc = 0, 0, 0.0
    for run in range(1, epochs + 1):
        correct = 0
        for rows in epoch_batches(images.shape[0], batch_size, gen):
            pause_point()
            x, y = as_input(images[rows], device), labels[rows].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            correct += int((logits.argmax(1) == y).sum())
            steps += 1
        acc = correct / max(1, images.shape[0])
        if stop_at_accuracy is not None and acc >= stop_at_accuracy:
            break
        if until is not None:
            model.eval()
            done = until()
            model.train()
            if done:
                break
    model.eval()
    return {"epochs": run, "steps": steps, "train_accuracy": acc}


def model_hash(model: nn.Module) -> str:
    """sha256 over the model's state_dict (names, dtypes, shapes and bytes), independent of the device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{value.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def ids_hash(ids: Any) -> str:
    """sha256 over sorted sample ids (the same rule as the index fingerprint)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def fresh_model(model: nn.Module, meta: Any, seed: int, device: torch.device) -> nn.Module:
    """A randomly initialised model of the same architecture, seeded without touching the global RNG.

    Uses ``tmu_core.models.build_model`` with the checkpoint metadata when ``meta`` names an architecture;
    otherwise deep-copies ``model`` and re-runs every submodule's ``reset_parameters``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if meta is not None and getattr(meta, "arch", None):
            from tmu_core.models import build_model

            fresh = build_model(meta.arch, num_classes=meta.num_classes, in_channels=meta.in_channels,
                                image_size=meta.image_size, mean=tuple(meta.mean), std=tuple(meta.std))
        else:
            fresh = copy.deepcopy(model)
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return fresh.to(device)


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when its weights are already on ``device``, else a copy moved there (never moves ``model``)."""
    target = torch.device(device)

    def placed(tensor: torch.Tensor) -> bool:
        return tensor.device.type == target.type and target.index in (None, tensor.device.index)

    if all(placed(t) for t in (*model.parameters(), *model.buffers())):
        return model
    return copy.deepcopy(model).to(target)


def copy_model(model: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of ``model`` on ``device``, with gradients enabled on every parameter."""
    clone = copy.deepcopy(model).to(device)
    for parameter in clone.parameters():
        parameter.requires_grad_(True)
    return clone


def subset_rows(n_pool: int, fraction: float, seed: int) -> torch.Tensor:
    """Sorted rows of a seeded random ``fraction`` of ``n_pool`` samples (at least one when the pool is not empty)."""
    count = max(1 if n_pool else 0, round(fraction * n_pool))
    return torch.randperm(n_pool, generator=generator(seed))[:count].sort().values
