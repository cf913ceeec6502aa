"""``bad_teacher``: competent and incompetent teachers (Chundawat et al., AAAI 2023).

The student starts as a copy of M_o. On D_f it is distilled towards an incompetent teacher (a randomly
initialised network of the same architecture); on a random subset of D_r towards the competent teacher
(M_o itself). Loss: KL(teacher || student) on temperature-scaled softmax outputs, one epoch, Adam.
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
from tmu_core.unlearn.common import (
    as_input,
    copy_model,
    epoch_batches,
    fresh_model,
    subset_rows,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadTeacherOptions:
    """Options of ``bad_teacher``.

    Attributes:
        epochs: passes over D_f + the D_r subset (the original: 1).
        lr: Adam learning rate (the original: 1e-4).
        temperature: distillation temperature.
        retain_fraction: share of D_r distilled from the competent teacher (the original: 0.3).
        batch_size: samples per step.
        seed: subset, shuffles and the incompetent teacher's initialisation.
    """

    epochs: int = 1
    lr: float = 1e-4
    temperature: float = 1.0
    retain_fraction: float = 0.3
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("bad_teacher", "epochs", self.epochs, 1)
        check_range("bad_teacher", "lr", self.lr, 0.0, low_open=True)
        check_range("bad_teacher", "temperature", self.temperature, 0.0, low_open=True)
        check_range("bad_teacher", "retain_fraction", self.retain_fraction, 0.0, 1.0)
        check_range("bad_teacher", "batch_size", self.batch_size, 2)
        check_range("bad_teacher", "seed", self.seed, 0)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-scaled softmax outputs, averaged over the batch."""
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), teacher, reduction="batchmean")


@register_method("bad_teacher")
class BadTeacher(UnlearnMethod):
    """Distil from an incompetent teacher on D_f and from M_o on a subset of D_r."""

    options_type = BadTeacherOptions

    def unlearn(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                workdir: Path | None = None) -> UnlearnOutcome:
        started = time.perf_counter()
        opts = self.options
        rows = subset_rows(len(data.nonempty("retain")), opts.retain_fraction, opts.seed + 1)
        # D_f rows first, then the D_r subset's; each step reads only its own batch.
        images = data.rows(data.nonempty("forget") + tuple(data.retain_ids[row] for row in rows.tolist()))
        is_forget = torch.cat([torch.ones(len(data.forget_ids), dtype=torch.bool),
                               torch.zeros(rows.numel(), dtype=torch.bool)])
        competent = copy_model(model, device).eval()
        incompetent = fresh_model(model, meta, opts.seed + 2, device).eval()
        student = copy_model(model, device)
        optimiser = torch.optim.Adam(student.parameters(), lr=opts.lr)
        gen, steps = generator(opts.seed), 0
        student.train()
        for _ in range(opts.epochs):
            for batch in epoch_batches(images.shape[0], opts.batch_size, gen):
                x01, forget_mask = as_input(images[batch], device), is_forget[batch].to(device)
                with torch.no_grad():
                    teacher = torch.where(forget_mask[:, None], incompetent(x01), competent(x01))
                loss = distill_loss(student(x01), teacher, opts.temperature)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                steps += 1
        student.eval()
        details = {"epochs": opts.epochs, "steps": steps, "retain_used": int(rows.numel())}
        return UnlearnOutcome(student, details, time.perf_counter() - started)
