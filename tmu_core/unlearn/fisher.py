"""``fisher``: Fisher forgetting (Golatkar et al., CVPR 2020).

Estimate the diagonal of the Fisher information of the weights on D_r, then add Gaussian noise to every
weight with variance ``alpha / F`` (capped at ``var_cap``): weights that D_r relies on (large F) barely
move, weights that only D_f needed are scrambled.

The Fisher diagonal is estimated with per-sample gradients of ``log p(y | x)`` where ``y`` is drawn from the
model's own predictive distribution (the true Fisher, not the empirical one), on up to ``samples`` random
retained samples, and scaled to the size of D_r (the Fisher of the whole retained set).

``alpha`` sets the trade-off and has no good value for a small over-fitted network: on ``cpu-small``
(``python scripts/tune_tmu.py run --variant fisher:alpha=1e-3 --variant fisher:alpha=1e-2 ...``; mean of
cat, ship and automobile) alpha 1e-3 left the model as it was (Delta 31.7, original 32.0);
1e-2 gave Delta 23.0 with ACC_Dtest 53.8 (original 64.0); 3e-2 gave Delta 16.3 with ACC_Dtest 35.7. The
default, 1e-2, is the smallest alpha measured that forgets visibly.
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
from torch.func import functional_call, grad, vmap

from tmu_core.device import generator
from tmu_core.unlearn.base import (
    UnlearnData,
    UnlearnMethod,
    UnlearnOutcome,
    check_range,
    register_method,
)
from tmu_core.unlearn.common import as_input, copy_model, subset_rows
from tmu_core.unlearn.data import LazyImages

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FisherOptions:
    """Options of ``fisher``.

    Attributes:
        alpha: noise scale (variance = alpha / Fisher).
        var_cap: upper bound of the per-weight variance before scaling by alpha.
        samples: most retained samples used to estimate the Fisher diagonal.
        chunk: samples per vectorised per-sample-gradient batch.
        seed: sample choice, sampled labels and the noise.
    """

    alpha: float = 1e-2
    var_cap: float = 1e3
    samples: int = 1000
    chunk: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("fisher", "alpha", self.alpha, 0.0, low_open=True)
        check_range("fisher", "var_cap", self.var_cap, 0.0, low_open=True)
        check_range("fisher", "samples", self.samples, 1)
        check_range("fisher", "chunk", self.chunk, 1)
        check_range("fisher", "seed", self.seed, 0)


def fisher_diagonal(model: nn.Module, images: torch.Tensor | LazyImages, device: torch.device, chunk: int,
                    gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Mean over ``images`` of the squared per-sample gradient of ``log p(y_sampled | x)``, per parameter.

    ``images`` (N, C, H, W) uint8 are read ``chunk`` rows at a time.

    The model runs in eval mode (batch norm uses its running statistics), so per-sample gradients are exact.
    """
    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def log_likelihood(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (weights, buffers), (x.unsqueeze(0),))
        return -F.cross_entropy(logits, y.unsqueeze(0))

    per_sample = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for start in range(0, images.shape[0], chunk):
        x01 = as_input(images[start:start + chunk], device)
        with torch.no_grad():
            probs = F.softmax(functional_call(model, (params, buffers), (x01,)), dim=1).cpu()
        sampled = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(device)
        grads = per_sample(params, x01, sampled)
        for name, value in grads.items():
            total[name] += value.pow(2).sum(dim=0)
    return {name: value / max(1, images.shape[0]) for name, value in total.items()}


@register_method("fisher")
class FisherForgetting(UnlearnMethod):
    """Add noise scaled by the inverse diagonal Fisher of D_r to every weight."""

    options_type = FisherOptions

    def unlearn(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                workdir: Path | None = None) -> UnlearnOutcome:
        started = time.perf_counter()
        opts = self.options
        n_retain = len(data.nonempty("retain"))
        rows = subset_rows(n_retain, min(1.0, opts.samples / n_retain), opts.seed + 1)
        gen = generator(opts.seed)
        tuned = copy_model(model, device)
        # Only the sampled retained images are read, one chunk at a time.
        sampled = data.rows([data.retain_ids[row] for row in rows.tolist()])
        fisher = fisher_diagonal(tuned, sampled, device, opts.chunk, gen)
        scrambled = 0
        with torch.no_grad():
            for name, param in tuned.named_parameters():
                variance = (1.0 / (fisher[name] * n_retain + 1e-8)).clamp(max=opts.var_cap)
                noise = torch.randn(param.shape, generator=gen).to(device)
                param.add_(noise * (opts.alpha * variance).sqrt())
                scrambled += int((variance >= opts.var_cap).sum())
        tuned.eval()
        details = {"alpha": opts.alpha, "fisher_samples": int(rows.numel()), "weights_at_var_cap": scrambled}
        return UnlearnOutcome(tuned, details, time.perf_counter() - started)
