"""``neg_grad_plus``: NegGrad+ (Kurmanji et al. 2023, "Towards Unbounded Machine Unlearning").

Each step lowers ``beta * CE(D_r batch) - (1 - beta) * CE(D_f batch)``: descent on retained samples, ascent on
the samples to forget, in one loss.

Where it departs from the paper:

- the run is ``epochs`` shuffled passes over D_f, each D_f batch paired with a random D_r batch (drawn with
  replacement), so its cost follows |D_f|; the authors' code walks D_r and cycles D_f;
- the two batches go through the model in one forward pass (batch norm normalises them together);
- the ascent term is clamped per sample: a D_f sample whose loss is above ``ascent_cap * ln(K)`` (K classes;
  ln K is the loss of a uniform guess) adds nothing to the loss and no gradient, so the ascent stops on the
  samples already forgotten instead of running away (the paper has no clamp; ``ascent_cap=None`` removes it).
  The clamp bounds the ascent's gradient, not the loss: SGD momentum still carries a sample some way past the
  cap, and the descent on D_r moves shared weights too (on the tests' tiny problem, forget losses ended far
  below those of the unclamped run, but above the cap).

Defaults are conservative (a small ascent weight, the clamp at the loss of a uniform guess); they have not been
tuned on ``cpu-small`` yet.
"""

from __future__ import annotations

import logging
import math
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
from tmu_core.unlearn.common import copy_model, paired_steps, sgd

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NegGradPlusOptions:
    """Options of ``neg_grad_plus``.

    Attributes:
        beta: weight of the retained loss; the forget loss gets ``1 - beta`` (1 = fine-tuning only).
        lr: SGD learning rate (momentum 0.9, weight decay 5e-4).
        epochs: passes over D_f (the bound on the ascent).
        forget_batch: D_f samples per step.
        retain_batch: D_r samples per step.
        ascent_cap: per-sample clamp of the forget loss, in units of ln(K), the loss of a uniform guess over the
            K classes; None: no clamp.
        seed: shuffles and the D_r draws.
    """

    beta: float = 0.9
    lr: float = 0.01
    epochs: int = 5
    forget_batch: int = 32
    retain_batch: int = 128
    ascent_cap: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("neg_grad_plus", "beta", self.beta, 0.0, 1.0)
        check_range("neg_grad_plus", "lr", self.lr, 0.0, low_open=True)
        check_range("neg_grad_plus", "epochs", self.epochs, 1)
        check_range("neg_grad_plus", "forget_batch", self.forget_batch, 1)
        check_range("neg_grad_plus", "retain_batch", self.retain_batch, 2)
        if self.ascent_cap is not None:
            check_range("neg_grad_plus", "ascent_cap", self.ascent_cap, 0.0, low_open=True)
        check_range("neg_grad_plus", "seed", self.seed, 0)


def capped_ascent(logits: torch.Tensor, labels: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, int]:
    """Mean per-sample cross-entropy with every loss above ``cap`` set to ``cap`` (no gradient there).

    Returns:
        The mean, and how many samples were at the cap.
    """
    losses = F.cross_entropy(logits, labels, reduction="none")
    if cap is None:
        return losses.mean(), 0
    return losses.clamp(max=cap).mean(), int((losses >= cap).sum())


@register_method("neg_grad_plus")
class NegGradPlus(UnlearnMethod):
    """Descent on D_r batches weighted ``beta`` and clamped ascent on D_f weighted ``1 - beta``, in one loss."""

    options_type = NegGradPlusOptions

    def unlearn(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                workdir: Path | None = None) -> UnlearnOutcome:
        started = time.perf_counter()
        opts = self.options
        _, forget_labels = data.tensors("forget")
        tuned = copy_model(model, device)
        optimiser, gen = sgd(tuned, opts.lr), generator(opts.seed)
        steps, capped, cap = 0, 0, None
        tuned.train()
        for forget_logits, forget_rows, retain_logits, retain_labels in paired_steps(
                tuned, data, epochs=opts.epochs, forget_batch=opts.forget_batch, retain_batch=opts.retain_batch,
                gen=gen, device=device):
            if cap is None and opts.ascent_cap is not None:
                cap = opts.ascent_cap * math.log(forget_logits.shape[1])
            ascent, at_cap = capped_ascent(forget_logits, forget_labels[forget_rows].to(device), cap)
            loss = opts.beta * F.cross_entropy(retain_logits, retain_labels) - (1.0 - opts.beta) * ascent
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps, capped = steps + 1, capped + at_cap
        tuned.eval()
        seconds = time.perf_counter() - started
        logger.info("neg_grad_plus: %d steps, %d forget losses at the cap", steps, capped)
        details = {"epochs": opts.epochs, "steps": steps, "beta": opts.beta, "lr": opts.lr,
                   "ascent_cap_nats": cap, "capped_samples": capped, "train_seconds": seconds}
        return UnlearnOutcome(tuned, details, seconds)
