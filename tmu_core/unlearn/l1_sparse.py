"""``l1_sparse``: l1-sparse fine-tuning (Jia et al., NeurIPS 2023, "Model sparsity can simplify machine unlearning").

Fine-tune M_o on D_r with the loss ``CE + gamma_t * sum(|theta|)`` over every parameter, where ``gamma_t``
falls linearly from ``gamma`` at the first step to 0 after the last: the penalty pushes weights towards
zero early (sparser models forget better), and the run ends as plain fine-tuning to restore accuracy.

Where it departs from the paper:

- ``gamma_t`` decays step by step (``gamma * (1 - t / T)`` over T steps); the authors lower it once an epoch;
- the batches are plain shuffled batches of D_r without augmentation, SGD with momentum 0.9 and weight decay
  5e-4 at a constant learning rate (the authors' runs use their training pipeline);
- a last batch of one image is skipped (batch norm in train mode needs two).

Defaults are conservative (the authors' gamma, half their 10 epochs); they have not been tuned on
``cpu-small`` yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tmu_core.device import generator
from tmu_core.unlearn.base import (
    UnlearnData,
    UnlearnMethod,
    UnlearnOutcome,
    check_range,
    register_method,
)
from tmu_core.unlearn.common import as_input, copy_model, epoch_batches, sgd

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class L1SparseOptions:
    """Options of ``l1_sparse``.

    Attributes:
        gamma: weight of the l1 penalty at the first step (0 = plain fine-tuning).
        lr: SGD learning rate.
        epochs: passes over D_r.
        batch_size: D_r samples per step.
        seed: shuffles.
    """

    gamma: float = 5e-4
    lr: float = 0.01
    epochs: int = 5
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("l1_sparse", "gamma", self.gamma, 0.0)
        check_range("l1_sparse", "lr", self.lr, 0.0, low_open=True)
        check_range("l1_sparse", "epochs", self.epochs, 1)
        check_range("l1_sparse", "batch_size", self.batch_size, 2)
        check_range("l1_sparse", "seed", self.seed, 0)


def l1_norm(model: nn.Module) -> torch.Tensor:
    """sum(|theta|) over every parameter of ``model`` (differentiable)."""
    return sum(p.abs().sum() for p in model.parameters())


@register_method("l1_sparse")
class L1Sparse(UnlearnMethod):
    """Fine-tune on D_r with an l1 penalty on the weights whose weight falls linearly to 0."""

    options_type = L1SparseOptions

    def unlearn(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                workdir: Path | None = None) -> UnlearnOutcome:
        started = time.perf_counter()
        opts = self.options
        retain_ids = data.nonempty("retain")
        images, labels = data.rows(retain_ids), data.labels_of(retain_ids)  # read a batch a step
        tuned = copy_model(model, device)
        optimiser, gen = sgd(tuned, opts.lr), generator(opts.seed)
        per_epoch = -(-images.shape[0] // opts.batch_size)
        total = opts.epochs * per_epoch
        with torch.no_grad():
            l1_before = float(l1_norm(tuned))
        steps, correct, seen = 0, 0, 0
        tuned.train()
        for epoch in range(opts.epochs):
            correct, seen = 0, 0
            for position, rows in enumerate(epoch_batches(images.shape[0], opts.batch_size, gen)):
                weight = opts.gamma * (1.0 - (epoch * per_epoch + position) / total)
                if rows.numel() < 2:
                    continue
                x, y = as_input(images[rows], device), labels[rows].to(device)
                logits = tuned(x)
                loss = F.cross_entropy(logits, y)
                if weight > 0:
                    loss = loss + weight * l1_norm(tuned)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                correct, seen, steps = correct + int((logits.argmax(1) == y).sum()), seen + int(y.numel()), steps + 1
        tuned.eval()
        with torch.no_grad():
            l1_after = float(l1_norm(tuned))
        seconds = time.perf_counter() - started
        details = {"epochs": opts.epochs, "steps": steps, "gamma": opts.gamma, "lr": opts.lr,
                   "l1_before": l1_before, "l1_after": l1_after,
                   "train_accuracy": 100.0 * correct / max(seen, 1), "train_seconds": seconds}
        return UnlearnOutcome(tuned, details, seconds)
