"""``salun``: SalUn, saliency-based unlearning (Fan et al., ICLR 2024, "Salient-weight unlearning").

Two phases:

1. the weight-saliency mask: the gradient of the cross-entropy on D_f (model in eval mode, summed over D_f)
   with respect to every parameter; the ``mask_fraction`` of weights with the largest gradient magnitude,
   one global ranking over all parameters (ties broken by position), are the salient ones;
2. random-label unlearning restricted to the mask: every D_f sample gets a random wrong label (drawn once),
   and each step lowers the cross-entropy over a D_f batch (with those labels) and a D_r batch (true labels),
   one mean over both. Only salient weights move: the gradient (weight decay included) of every other weight
   is zeroed before each optimiser step, and after the step they are put back from a copy taken before the
   run, so they stay bit-identical whatever the optimiser's momentum does.

Where it departs from the paper:

- the run is ``epochs`` passes over D_f, each D_f batch paired with a random D_r batch (drawn with
  replacement), so its cost follows |D_f|; the authors train on D_f with random labels joined to D_r;
- the random label is never the true one (the authors draw from all classes);
- weight decay is applied by hand to the salient weights only (the authors' SGD decays every weight);
- batch-norm running statistics are buffers, not weights: they still follow the batches seen in train mode.

Defaults are conservative (the authors' 0.5 mask, a short run at lr 0.01); they have not been tuned on
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
from tmu_core.unlearn.baselines import random_wrong_labels
from tmu_core.unlearn.common import as_input, copy_model, inference_batch, paired_steps, sgd

logger = logging.getLogger(__name__)

WEIGHT_DECAY = 5e-4


@dataclass(frozen=True)
class SalunOptions:
    """Options of ``salun``.

    Attributes:
        mask_fraction: share of all weights in the saliency mask (the only ones updated).
        lr: SGD learning rate (momentum 0.9).
        epochs: passes over D_f.
        forget_batch: D_f samples per step.
        retain_batch: D_r samples per step.
        seed: the random labels, shuffles and D_r draws.
    """

    mask_fraction: float = 0.5
    lr: float = 0.01
    epochs: int = 5
    forget_batch: int = 32
    retain_batch: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("salun", "mask_fraction", self.mask_fraction, 0.0, 1.0, low_open=True)
        check_range("salun", "lr", self.lr, 0.0, low_open=True)
        check_range("salun", "epochs", self.epochs, 1)
        check_range("salun", "forget_batch", self.forget_batch, 1)
        check_range("salun", "retain_batch", self.retain_batch, 2)
        check_range("salun", "seed", self.seed, 0)


def saliency_mask(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, fraction: float,
                  device: torch.device) -> list[torch.Tensor]:
    """One bool tensor per parameter of ``model``: True for the ``fraction`` of weights most salient on D_f.

    Saliency is |d CE / d theta| of the cross-entropy summed over ``images`` (model in eval mode; the
    gradients are left cleared). The ranking is global and exact: ``round(fraction * total)`` weights (at least
    one), ties broken by position, so the mask does not depend on the device.
    """
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()
    batch = inference_batch(images)
    for start in range(0, images.shape[0], batch):
        logits = model(as_input(images[start:start + batch], device))
        F.cross_entropy(logits, labels[start:start + batch].to(device), reduction="sum").backward()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().abs().reshape(-1).cpu()
                      for p in params])
    model.zero_grad(set_to_none=True)
    count = max(1, round(fraction * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:count]] = True
    return [part.reshape(p.shape).to(p.device) for part, p in zip(keep.split([p.numel() for p in params]), params)]


@register_method("salun")
class Salun(UnlearnMethod):
    """Random-label unlearning with D_r batches, updating only the weights most salient to the D_f loss."""

    options_type = SalunOptions

    def unlearn(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                workdir: Path | None = None) -> UnlearnOutcome:
        started = time.perf_counter()
        opts = self.options
        forget_images, forget_labels = data.tensors("forget")
        data.nonempty("retain")  # before the mask's work
        gen = generator(opts.seed)
        wrong = random_wrong_labels(forget_labels, int(meta.num_classes), gen).to(device)
        tuned = copy_model(model, device)
        params = list(tuned.parameters())
        masks = saliency_mask(tuned, forget_images, forget_labels, opts.mask_fraction, device)
        frozen = [p.detach().clone() for p in params]
        mask_seconds = time.perf_counter() - started
        optimiser = sgd(tuned, opts.lr, weight_decay=0.0)  # decay by hand below, on the salient weights only
        steps = 0
        tuned.train()
        for forget_logits, forget_rows, retain_logits, retain_labels in paired_steps(
                tuned, data, epochs=opts.epochs, forget_batch=opts.forget_batch, retain_batch=opts.retain_batch,
                gen=gen, device=device):
            loss = F.cross_entropy(torch.cat([forget_logits, retain_logits]),
                                   torch.cat([wrong[forget_rows.to(device)], retain_labels]))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p, mask in zip(params, masks):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.add_(p, alpha=WEIGHT_DECAY).masked_fill_(~mask, 0.0)
            optimiser.step()
            with torch.no_grad():
                for p, mask, original in zip(params, masks, frozen):
                    p.copy_(torch.where(mask, p, original))
            steps += 1
        tuned.eval()
        seconds = time.perf_counter() - started
        masked, total = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
        logger.info("salun: %d of %d weights in the mask, %d steps", masked, total, steps)
        details = {"epochs": opts.epochs, "steps": steps, "lr": opts.lr, "mask_fraction": opts.mask_fraction,
                   "masked_weights": masked, "total_weights": total, "mask_seconds": mask_seconds,
                   "train_seconds": seconds - mask_seconds}
        return UnlearnOutcome(tuned, details, seconds)
