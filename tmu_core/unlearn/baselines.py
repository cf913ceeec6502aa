"""Baseline unlearning methods, each registered behind the same interface as ``tmu``.

- ``retrain``: the gold standard, a fresh model trained on D_r with the original recipe (``meta.recipe``).
- ``finetune``: fine-tune on D_r with a constant, slightly larger learning rate for a few epochs.
- ``neg_grad``: gradient ascent on D_f (with a descent term on D_r batches, as the paper's "fine-tune on D"),
  for a bounded number of passes over D_f.
- ``random_label``: fine-tune on D with a random wrong label on every D_f sample (Graves et al. 2021).
- ``bad_teacher`` and ``fisher`` live in :mod:`tmu_core.unlearn.bad_teacher` and :mod:`tmu_core.unlearn.fisher`.
- ``neg_grad_plus``, ``salun`` and ``l1_sparse`` live in :mod:`tmu_core.unlearn.neg_grad_plus`,
  :mod:`tmu_core.unlearn.salun` and :mod:`tmu_core.unlearn.l1_sparse`.

None of them holds D_r in memory at once: each step reads its own batch of it (``UnlearnData.rows``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tmu_core.device import generator
from tmu_core.errors import InvalidInputError
from tmu_core.unlearn.base import (
    UnlearnData,
    UnlearnMethod,
    UnlearnOutcome,
    check_range,
    register_method,
)
from tmu_core.unlearn.common import as_input, copy_model, epoch_batches, sgd
from tmu_core.unlearn.data import LazyImages
from tmu_core.unlearn.recipe import fit_rows, pixel_stats

logger = logging.getLogger(__name__)


def recipe_config(meta: Any) -> Any:
    """The original model's :class:`tmu_core.train.TrainConfig`, rebuilt from ``meta.recipe``.

    Raises:
        InvalidInputError: no metadata, or its recipe is not a training recipe.
    """
    from tmu_core.train import TrainConfig

    recipe = getattr(meta, "recipe", None)
    if not isinstance(recipe, dict):
        raise InvalidInputError("this method needs the checkpoint metadata's training recipe (meta.recipe)")
    while isinstance(recipe.get("base"), dict) and "unlearn" in recipe:  # an unlearned model: its parent's
        recipe = recipe["base"]
    if isinstance(recipe.get("train"), dict):  # a derived or imported model keeps its recipe under "train"
        recipe = recipe["train"]
    return TrainConfig.from_dict(recipe)


def _fit_copy(model: nn.Module, images: LazyImages, labels: torch.Tensor, cfg: Any,
              device: torch.device) -> tuple[nn.Module, float]:
    """A copy of ``model`` trained with ``cfg`` on rows read one batch at a time; and its last train accuracy."""
    tuned = copy_model(model, device)
    return tuned, fit_rows(tuned, images, labels, cfg, device)


@dataclass(frozen=True)
class RetrainOptions:
    """Options of ``retrain``: ``seed`` and ``epochs`` override the recipe's when given."""

    seed: int | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if self.seed is not None:
            check_range("retrain", "seed", self.seed, 0)
        if self.epochs is not None:
            check_range("retrain", "epochs", self.epochs, 1)


@register_method("retrain")
class Retrain(UnlearnMethod):
    """A model trained from scratch on D_r with the original recipe (initialised as ``train_model`` does).

    D_r is read one batch at a time: once for its pixel statistics (the model's normalisation), then by the
    recipe's shuffled batches in every epoch.
    """

    options_type = RetrainOptions

    def unlearn(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                workdir: Path | None = None) -> UnlearnOutcome:
        from tmu_core.models import build_model

        started = time.perf_counter()
        cfg = recipe_config(meta)
        cfg = replace(cfg, seed=self.options.seed if self.options.seed is not None else cfg.seed,
                      epochs=self.options.epochs or cfg.epochs)
        mean, std = pixel_stats(data.batches(data.nonempty("retain")))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            fresh = build_model(meta.arch, meta.num_classes, meta.in_channels, meta.image_size, mean, std)
        train_accuracy = fit_rows(fresh, data.rows(data.retain_ids), data.labels_of(data.retain_ids), cfg, device)
        details = {"epochs": cfg.epochs, "seed": cfg.seed, "train_accuracy": train_accuracy}
        return UnlearnOutcome(fresh, details, time.perf_counter() - started)


@dataclass(frozen=True)
class FinetuneOptions:
    """Options of ``finetune``: epochs on D_r at a constant learning rate."""

    epochs: int = 5
    lr: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("finetune", "epochs", self.epochs, 1)
        check_range("finetune", "lr", self.lr, 0.0, low_open=True)
        check_range("finetune", "seed", self.seed, 0)


@register_method("finetune")
class Finetune(UnlearnMethod):
    """Fine-tune M_o on D_r only (the original recipe's batch size and augmentation, constant lr)."""

    options_type = FinetuneOptions

    def unlearn(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                workdir: Path | None = None) -> UnlearnOutcome:
        started = time.perf_counter()
        opts = self.options
        cfg = replace(recipe_config(meta), epochs=opts.epochs, lr=opts.lr, gamma=1.0, seed=opts.seed)
        retain_ids = data.nonempty("retain")
        tuned, train_accuracy = _fit_copy(model, data.rows(retain_ids), data.labels_of(retain_ids), cfg, device)
        details = {"epochs": opts.epochs, "lr": opts.lr, "train_accuracy": train_accuracy}
        return UnlearnOutcome(tuned, details, time.perf_counter() - started)


@dataclass(frozen=True)
class NegGradOptions:
    """Options of ``neg_grad``.

    Attributes:
        epochs: passes over D_f (the bound on the ascent).
        lr: SGD learning rate.
        batch_size: D_f samples per step (and retained samples per step when ``retain_weight > 0``).
        retain_weight: weight of the descent term on D_r batches (0 = pure ascent on D_f).
        seed: shuffles.
    """

    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 64
    retain_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("neg_grad", "epochs", self.epochs, 1)
        check_range("neg_grad", "lr", self.lr, 0.0, low_open=True)
        check_range("neg_grad", "batch_size", self.batch_size, 2)
        check_range("neg_grad", "retain_weight", self.retain_weight, 0.0)
        check_range("neg_grad", "seed", self.seed, 0)


@register_method("neg_grad")
class NegGrad(UnlearnMethod):
    """Raise the loss on D_f (gradient ascent) while lowering it on D_r batches, for ``epochs`` passes."""

    options_type = NegGradOptions

    def unlearn(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                workdir: Path | None = None) -> UnlearnOutcome:
        started = time.perf_counter()
        opts = self.options
        forget_images, forget_labels = data.tensors("forget")
        retain_images, retain_labels = None, None
        if opts.retain_weight > 0:  # random retained batches, read one step at a time
            retain_ids = data.nonempty("retain")
            retain_images, retain_labels = data.rows(retain_ids), data.labels_of(retain_ids)
        tuned = copy_model(model, device)
        optimiser, gen = sgd(tuned, opts.lr), generator(opts.seed)
        tuned.train()
        steps = 0
        for _ in range(opts.epochs):
            for rows in epoch_batches(forget_images.shape[0], opts.batch_size, gen):
                logits = tuned(as_input(forget_images[rows], device))
                loss = -F.cross_entropy(logits, forget_labels[rows].to(device))
                if retain_images is not None:
                    pick = torch.randint(0, retain_images.shape[0], (opts.batch_size,), generator=gen)
                    retain_logits = tuned(as_input(retain_images[pick], device))
                    loss = loss + opts.retain_weight * F.cross_entropy(retain_logits, retain_labels[pick].to(device))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                steps += 1
        tuned.eval()
        return UnlearnOutcome(tuned, {"epochs": opts.epochs, "steps": steps}, time.perf_counter() - started)


@dataclass(frozen=True)
class RandomLabelOptions:
    """Options of ``random_label``: epochs over D (D_f relabelled at random) at a constant learning rate."""

    epochs: int = 2
    lr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("random_label", "epochs", self.epochs, 1)
        check_range("random_label", "lr", self.lr, 0.0, low_open=True)
        check_range("random_label", "seed", self.seed, 0)


def random_wrong_labels(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random label different from each true label."""
    if num_classes < 2:
        raise InvalidInputError(f"random labels need at least 2 classes, got {num_classes}")
    shift = torch.randint(1, num_classes, labels.shape, generator=gen)
    return (labels.cpu() + shift) % num_classes


@register_method("random_label")
class RandomLabel(UnlearnMethod):
    """Fine-tune on D_r + D_f where every D_f sample carries a random wrong label."""

    options_type = RandomLabelOptions

    def unlearn(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                workdir: Path | None = None) -> UnlearnOutcome:
        started = time.perf_counter()
        opts = self.options
        forget_labels = data.labels_of(data.nonempty("forget"))
        wrong = random_wrong_labels(forget_labels, int(meta.num_classes), generator(opts.seed))
        images = data.rows(data.nonempty("retain") + data.forget_ids)  # D_r rows first, then D_f's
        labels = torch.cat([data.labels_of(data.retain_ids), wrong])
        cfg = replace(recipe_config(meta), epochs=opts.epochs, lr=opts.lr, gamma=1.0, seed=opts.seed)
        tuned, train_accuracy = _fit_copy(model, images, labels, cfg, device)
        details = {"epochs": opts.epochs, "lr": opts.lr, "train_accuracy": train_accuracy}
        return UnlearnOutcome(tuned, details, time.perf_counter() - started)
