"""TMU's unlearning fine-tune (paper Eq. 2 and Eq. 3) with a bounded hard-sample objective and a stopping rule.

Each step lowers the model's accuracy on the predicted-hard forget samples and keeps it on the predicted-easy
ones:

    loss = hard_term(clean hard samples) + easy_weight * easy_term(easy samples + Gaussian noise)
           [+ retain_weight * CE(a batch of retained samples)]

The easy term is the cross-entropy, or, when the easy samples carry a target logit margin each,
``|margin - target|`` with ``margin = z_y - max_{j != y} z_j``: a memorised sample (a huge margin) is made
less confident until it looks like a held-out sample the model classifies correctly, which is how the gold
model, never trained on it, sees an easy sample (and what a membership attack compares against). The margin,
unlike the cross-entropy, keeps its gradient when the sample is saturated.

``noise_std = 0`` is the naive Eq. 2; ``noise_std > 0`` is Eq. 3. The noise std is in units of 1/255 of the
pixel range (so the paper's levels 0, 1, 3, 5, 10 read as 0..10/255 on [0, 1] inputs), added to the [0, 1]
inputs without clamping.

The paper's hard term maximises cross-entropy without limit, which runs away (the model collapses for the
whole class). Two bounded terms are offered instead:

- ``"margin"``: ``relu(z_y - max_{j != y} z_j + margin)``, zero once the true class trails the best other
  class by ``margin`` logits;
- ``"ce_clamp"``: ``-min(CE, ascent_cap)``, the paper's ascent with no gradient once the loss reaches the cap.

Stopping rule: stop as soon as every predicted-hard sample is misclassified and no predicted-easy sample that
was correct at the start has become wrong (``"aligned"``), after ``max_steps`` (``"max_steps"``), or when the
guard refuses a step at the smallest rate it allows (``"guard"``). With ``easy_slack`` set and target margins on
the easy samples, "aligned" also needs the easy samples' mean excess over their targets,
``mean(relu(margin - target))``, to be at most ``easy_slack`` logits: the hard samples of a small request are
misclassified within a few steps, long before the easy ones have lost their memorised confidence, and a
per-example membership test (LiRA) then still finds them.
``tolerance`` lets a share of the forget samples stay misaligned at the stop: the last one or two
memorised hard samples can take as many steps as all the others together.
Guard (``guard_drop``, off when None): a step that lowers the model's accuracy on a guard set of held-out
images (TMU passes part of its twin set) by more than ``guard_drop`` points below the start is taken back
(weights and optimiser state), and tried again at half the learning rate, which stays halved; after
``guard_halvings`` halvings the run stops (``"guard"``). In ``guard_mode="repair"`` the step is kept and
followed by repair steps until the guard set is back within ``guard_drop`` of a level: the start, or the
``guard_level`` the caller gives (TMU gives the accuracy of the lineage's fully prepared version, so that
the costs of a stream of small requests do not add up). One optimiser step on a handful of memorised
samples moves every weight by about the learning rate (Adam's first steps are sign steps whatever the
gradient's size), which on a one- or two-sample request cost up to 12 points of test accuracy; the guard
bounds that cost where it is measured instead of guessing a learning rate for every request size.

Consolidation (``consolidate_steps``, 0: off): once the run is aligned, that many more steps with the easy
term made one-sided (``relu(margin - target) + relu(-margin)``: an easy sample above its target is still pulled
down, and one that turned wrong is pushed back, but one between the boundary and its target is left alone) and
the hinge and the retain term as before. With the hard samples past their margin the
loss is then mostly the KL term, which pulls the function on retained samples back to where the request
started: what the forget steps cost elsewhere is repaired instead of left behind. A request that stops as soon
as it is aligned keeps that cost, and on a stream of small requests the costs add up. Consolidation ends aligned:
when its last step leaves more than ``tolerance`` of the forget samples misaligned (on a class-sized request the
hinge on the hard samples can drag the easy samples of the same class across the boundary), steps with the
two-sided easy term follow until the run is aligned again, at most ``consolidate_steps`` of them
(``realigned_steps`` in the result). A run aligned before its first step (a request the model already treats as
unseen) took no forget step, so it has nothing to consolidate and returns the model as it was.

Held-out anchor (``held_out_weight``, 0: off): a KL term on a batch of held-out images (TMU passes the twin images
the guard does not measure) towards reference logits the caller gives (TMU gives the lineage's version's, kept in
its prepared state). The retain term holds the function on training samples, where the model is saturated and a
step's cost is hardly seen; what a stream of small requests loses is accuracy on images it was never trained on,
and this term measures the model there, against the version whose accuracy the stream should keep.

Large requests (``forget_scale``): the hard term is a batch mean and the retain and held-out terms have fixed
weights, so each hard sample of a 500-sample request is pushed about a fifth as hard as one of a 100-sample
request, while the model has more to unlearn. Above ``forget_scale`` samples the hard term's weight grows with the
request's size. The easy term keeps its weight: scaled too, it cost more accuracy on unseen images.

By default the model is fine-tuned in eval mode (``bn="frozen"``), so batch-norm statistics are not skewed by
the small, one-class forget batches; ``bn="batch"`` normalises with each step's batch instead (gradients then
have the scale of ordinary training) and still leaves the running statistics unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from tmu_core.device import generator
from tmu_core.errors import DivergedError, InvalidInputError
from tmu_core.unlearn.base import check_choice, check_range
from tmu_core.unlearn.common import as_input, correct_of, eval_mode, logits_of, sgd
from tmu_core.unlearn.data import LazyImages

logger = logging.getLogger(__name__)

HARD_OBJECTIVES = ("margin", "ce_clamp")
OPTIMIZERS = ("sgd", "adam")
BN_MODES = ("frozen", "batch")
RETAIN_LOSSES = ("ce", "kl")
GUARD_MODES = ("halve", "repair")


@dataclass(frozen=True)
class TuneConfig:
    """Settings of the unlearning fine-tune.

    Attributes:
        lr: learning rate.
        max_steps: most optimiser steps.
        min_steps: steps to run before the stopping rule may end the run.
        tolerance: share of the forget samples (hard still correct, or easy turned wrong) that may be
            misaligned when the stopping rule ends the run.
        hard_objective: ``"margin"`` or ``"ce_clamp"`` (see the module docstring).
        margin: logit margin of the ``"margin"`` objective.
        ascent_cap: loss cap of the ``"ce_clamp"`` objective.
        easy_weight: weight of the predicted-easy term.
        noise_std: Gaussian noise std on the predicted-easy inputs, in units of 1/255 (0 = Eq. 2).
        retain_weight: weight of a term on retained samples (0 = the paper's objective).
        retain_loss: ``"ce"`` (cross-entropy with the labels) or ``"kl"`` (KL divergence from the original
            model's outputs, which keeps the function on D_r where it was).
        retain_batch: retained samples per step when ``retain_weight > 0``.
        batch_size: most forget samples per step (all of them when fewer).
        easy_batch: most predicted-easy samples per step (they only anchor the fine-tune, and the stopping
            rule still checks every one of them).
        optimizer: ``"sgd"`` (momentum 0.9, weight decay 5e-4) or ``"adam"``.
        bn: ``"frozen"``: the model runs in eval mode (running batch-norm statistics);
            ``"batch"``: train mode, normalising with the step's batch, running statistics left unchanged.
        guard_drop: accuracy points on the guard set a step may cost below the start (None: no guard).
        guard_halvings: how many times a refused step may halve the learning rate before the run stops.
        guard_mode: ``"halve"``: a refused step is taken back and retried at half the rate, and the run stops
            once the rate may not be halved again; ``"repair"``: the step is kept and followed by repair steps
            (retained and predicted-easy samples only) until the guard set is back within ``guard_drop``, at
            most ``guard_repairs`` of them; every step counts towards ``max_steps``.
        guard_repairs: most repair steps after one forget step (``"repair"``).
        warmup_steps: the learning rate rises linearly from ``lr / warmup_steps`` to ``lr`` over the first
            ``warmup_steps`` steps (0: ``lr`` from the first step).
        easy_slack: logits the easy samples' mean excess over their target margins may be when the stopping rule
            ends the run (None: not checked; ignored when the easy samples carry no targets).
        consolidate_steps: steps after the run is aligned, with the easy term one-sided (see the module
            docstring); they do not count towards ``max_steps``, and a run aligned before its first step takes
            none.
        realign: after the consolidation steps, take two-sided steps while more than ``tolerance`` of the forget
            samples are misaligned, at most ``consolidate_steps`` (False: end after the consolidation steps).
        held_out_weight: weight of the KL term towards reference logits on a batch of held-out images (0: off;
            ``retain_batch`` images a step; see the module docstring).
        forget_scale: forget samples (hard and easy) above which the hard term weighs with the request: its mean
            is multiplied by ``(hard + easy) / forget_scale``, so that each hard sample of a large request is
            pushed against the retain and held-out terms about as hard as one of a ``forget_scale``-sample request
            (None: its plain mean, whatever the request's size; see the module docstring).
        seed: noise and batch sampling.
    """

    lr: float = 3e-4
    max_steps: int = 60
    min_steps: int = 0
    tolerance: float = 0.03
    hard_objective: str = "margin"
    margin: float = 1.0
    ascent_cap: float = 4.0
    easy_weight: float = 1.0
    noise_std: float = 8.0
    retain_weight: float = 10.0
    retain_loss: str = "kl"
    retain_batch: int = 32
    batch_size: int = 256
    easy_batch: int = 32
    optimizer: str = "adam"
    bn: str = "frozen"
    guard_drop: float | None = None
    guard_halvings: int = 4
    guard_mode: str = "halve"
    guard_repairs: int = 20
    warmup_steps: int = 0
    easy_slack: float | None = None
    consolidate_steps: int = 0
    realign: bool = True
    held_out_weight: float = 0.0
    forget_scale: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "TuneConfig"
        check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)
        check_choice(owner, "bn", self.bn, BN_MODES)
        check_choice(owner, "retain_loss", self.retain_loss, RETAIN_LOSSES)
        check_range(owner, "lr", self.lr, 0.0, low_open=True)
        check_range(owner, "max_steps", self.max_steps, 1)
        check_range(owner, "min_steps", self.min_steps, 0, self.max_steps)
        check_range(owner, "tolerance", self.tolerance, 0.0, 1.0)
        check_choice(owner, "hard_objective", self.hard_objective, HARD_OBJECTIVES)
        check_range(owner, "margin", self.margin, 0.0)
        check_range(owner, "ascent_cap", self.ascent_cap, 0.0, low_open=True)
        check_range(owner, "easy_weight", self.easy_weight, 0.0)
        check_range(owner, "noise_std", self.noise_std, 0.0, 255.0)
        check_range(owner, "retain_weight", self.retain_weight, 0.0)
        check_range(owner, "retain_batch", self.retain_batch, 1)
        check_range(owner, "batch_size", self.batch_size, 1)
        check_range(owner, "easy_batch", self.easy_batch, 1)
        if self.guard_drop is not None:
            check_range(owner, "guard_drop", self.guard_drop, 0.0, 100.0)
        check_range(owner, "guard_halvings", self.guard_halvings, 0)
        check_range(owner, "warmup_steps", self.warmup_steps, 0)
        check_choice(owner, "guard_mode", self.guard_mode, GUARD_MODES)
        check_range(owner, "guard_repairs", self.guard_repairs, 0)
        if self.easy_slack is not None:
            check_range(owner, "easy_slack", self.easy_slack, 0.0)
        check_range(owner, "consolidate_steps", self.consolidate_steps, 0)
        check_range(owner, "held_out_weight", self.held_out_weight, 0.0)
        if self.forget_scale is not None:
            check_range(owner, "forget_scale", self.forget_scale, 1)

    def rate(self, step: int) -> float:
        """The learning rate of step ``step`` (counted from 0), before any halving by the guard."""
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr


@dataclass(frozen=True)
class TuneSet:
    """uint8 images (N, C, H, W) and labels (N,) of one group of samples (may be empty), and optionally a
    target logit margin (N,) for each sample of the easy group, or reference logits (N, K) for each held-out image.

    ``images`` is a tensor, or :class:`tmu_core.unlearn.data.LazyImages` for retained samples: a step then
    reads only the batch it draws.
    """

    images: torch.Tensor | LazyImages
    labels: torch.Tensor
    margin_target: torch.Tensor | None = None
    reference_logits: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class TuneResult:
    """What the fine-tune did: steps taken, why it stopped, accuracies (percent) before and after, and the easy
    samples' mean excess over their target margins at the end (None without targets)."""

    steps: int
    stop_reason: str
    hard_accuracy_before: float
    hard_accuracy_after: float
    easy_accuracy_before: float
    easy_accuracy_after: float
    seconds: float
    guard_accuracy_before: float | None = None
    guard_accuracy_after: float | None = None
    refused_steps: int = 0
    guard_level: float | None = None
    easy_excess_after: float | None = None
    consolidated_steps: int = 0
    realigned_steps: int = 0


@dataclass(frozen=True)
class _Parts:
    """The samples and models one fine-tune works with (see :func:`forget_finetune`'s arguments)."""

    hard: TuneSet
    easy: TuneSet
    retain: TuneSet | None
    held_out: TuneSet | None
    anchor: nn.Module | None


def hard_loss(logits: torch.Tensor, labels: torch.Tensor, config: TuneConfig) -> torch.Tensor:
    """The bounded hard-sample term (mean over the batch; lower = further from the true class)."""
    if config.hard_objective == "margin":
        return F.relu(logit_margin(logits, labels) + config.margin).mean()
    return -F.cross_entropy(logits, labels, reduction="none").clamp(max=config.ascent_cap).mean()


def _accuracy(correct: torch.Tensor) -> float:
    return 100.0 * correct.float().mean().item() if correct.numel() else 0.0


def _pick(part: TuneSet, count: int, gen: torch.Generator) -> TuneSet:
    """``count`` random samples of ``part`` (all of it when it has no more), with their images read."""
    if count >= part.size:
        return part if isinstance(part.images, torch.Tensor) else TuneSet(part.images[:], part.labels,
                                                                           part.margin_target, part.reference_logits)
    rows = torch.randperm(part.size, generator=gen)[:count] if count > 0 else torch.zeros(0, dtype=torch.long)
    target = part.margin_target[rows] if part.margin_target is not None else None
    reference = part.reference_logits[rows] if part.reference_logits is not None else None
    return TuneSet(part.images[rows], part.labels[rows], target, reference)


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) ``z_y - max_{j != y} z_j``: positive when the sample is classified correctly."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    return true - logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)


def easy_loss(logits: torch.Tensor, part: TuneSet, device: torch.device, one_sided: bool = False) -> torch.Tensor:
    """CE of the easy batch, or its mean distance to the samples' target margins when they have them (when
    ``one_sided``: only the excess above the target, and how far a sample is on the wrong side of the boundary)."""
    labels = part.labels.to(device)
    if part.margin_target is None:
        return F.cross_entropy(logits, labels)
    margin = logit_margin(logits, labels)
    gap = margin - part.margin_target.to(device)
    return (F.relu(gap) + F.relu(-margin) if one_sided else gap.abs()).mean()


def _retain_term(logits: torch.Tensor, part: TuneSet, anchor: nn.Module | None, config: TuneConfig,
                 device: torch.device) -> torch.Tensor:
    if config.retain_loss == "ce" or anchor is None:
        return F.cross_entropy(logits, part.labels.to(device))
    with torch.no_grad(), eval_mode(anchor):
        target = anchor(as_input(part.images, device))
    return _kl(logits, target)


def _kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)), the batch mean."""
    return F.kl_div(F.log_softmax(logits, dim=1), F.softmax(target_logits, dim=1), reduction="batchmean")


def _step_loss(model: nn.Module, parts: _Parts, config: TuneConfig, gen: torch.Generator, device: torch.device,
               one_sided: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step's objective, and, when it comes for free, which hard samples the model classifies correctly.

    The hard, easy, retain and held-out batches go through the model together (so batch statistics, in
    ``bn="batch"``, mix them). In eval mode with all hard samples in the batch, their correctness comes from this
    forward pass.
    """
    hard, easy, retain, held_out = parts.hard, parts.easy, parts.retain, parts.held_out
    share = config.batch_size / max(1, hard.size + easy.size)
    hard_b = _pick(hard, max(1, round(hard.size * share)), gen)
    easy_count = min(config.easy_batch, max(1, round(easy.size * share))) if config.easy_weight > 0 else 0
    easy_b = _pick(easy, easy_count, gen)
    use_retain = retain is not None and retain.size > 0 and config.retain_weight > 0
    retain_b = _pick(retain, config.retain_batch, gen) if use_retain else _pick(hard, 0, gen)
    use_held = held_out is not None and held_out.size > 0 and config.held_out_weight > 0
    held_b = _pick(held_out, config.retain_batch, gen) if use_held else _pick(hard, 0, gen)
    easy_x = as_input(easy_b.images, device)
    if config.noise_std > 0 and easy_b.size:
        easy_x = easy_x + (config.noise_std / 255.0) * torch.randn(easy_x.shape, generator=gen).to(device)
    groups = (as_input(hard_b.images, device), easy_x, as_input(retain_b.images, device),
              as_input(held_b.images, device))
    hard_logits, easy_logits, retain_logits, held_logits = model(torch.cat(groups)).split(
        [hard_b.size, easy_b.size, retain_b.size, held_b.size])
    loss = torch.zeros((), device=device)
    if hard_b.size:
        loss = loss + _hard_scale(hard.size + easy.size, config) * hard_loss(hard_logits, hard_b.labels.to(device),
                                                                             config)
    if easy_b.size:
        loss = loss + config.easy_weight * easy_loss(easy_logits, easy_b, device, one_sided)
    if retain_b.size:
        loss = loss + config.retain_weight * _retain_term(retain_logits, retain_b, parts.anchor, config, device)
    if held_b.size:
        loss = loss + config.held_out_weight * _kl(held_logits, held_b.reference_logits.to(device))
    if config.bn == "frozen" and hard_b.size == hard.size:
        return loss, hard_logits.detach().argmax(1) == hard.labels.to(device)
    return loss, None


def _hard_scale(samples: int, config: TuneConfig) -> float:
    """Weight of the hard term for a request of ``samples``: ``samples / forget_scale`` above it, else 1."""
    return 1.0 if config.forget_scale is None else max(1.0, samples / config.forget_scale)


def _check_finite(loss: torch.Tensor, step: int, config: TuneConfig) -> None:
    """Stop a run whose loss is no longer a number, before it steps on it (the caller's model copy is then
    discarded, and the version it came from stays as it was)."""
    if not torch.isfinite(loss):
        raise DivergedError(f"the forget fine-tune diverged at step {step}: its loss is {loss.item()} "
                            f"(optimizer {config.optimizer!r}, lr {config.lr}); no version was made from it. "
                            f"Lower the learning rate, or use the method's defaults")


def _correct(model: nn.Module, part: TuneSet, device: torch.device) -> torch.Tensor:
    if not part.size:
        return torch.zeros(0, dtype=torch.bool, device=device)
    return correct_of(model, part.images, part.labels, device)


def _easy_state(model: nn.Module, easy: TuneSet, device: torch.device) -> tuple[torch.Tensor, float]:
    """Which easy samples the model classifies correctly, and their mean excess over their target margins
    (0.0 without targets)."""
    if not easy.size:
        return torch.zeros(0, dtype=torch.bool, device=device), 0.0
    logits = logits_of(model, easy.images, device)
    labels = easy.labels.to(device)
    correct = logits.argmax(dim=1) == labels
    if easy.margin_target is None:
        return correct, 0.0
    excess = F.relu(logit_margin(logits, labels) - easy.margin_target.to(device))
    return correct, float(excess.mean())


@contextlib.contextmanager
def _bn_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Eval mode (``frozen``) or train mode with running batch-norm statistics kept as they are (``batch``)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    model.train(mode == "batch")
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()


def _optimiser(model: nn.Module, config: TuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return sgd(model, config.lr)


class _Guard:
    """Takes back (or repairs) a step that costs more than ``drop`` accuracy points on held-out images (see the
    docstring); ``level``: the accuracy that repair steps restore (None: the start)."""

    def __init__(self, model: nn.Module, optimiser: torch.optim.Optimizer, part: TuneSet, config: TuneConfig,
                 device: torch.device, level: float | None = None) -> None:
        self.model, self.optimiser, self.part, self.config, self.device = model, optimiser, part, config, device
        self.start = self.now = self.accuracy()
        self.level = self.start if level is None else level
        self.refused = 0
        self.factor = 1.0  # halved at each refusal, and stays so

    def accuracy(self) -> float:
        return _accuracy(_correct(self.model, self.part, self.device))

    def step(self, rate: float) -> bool:
        """One optimiser step at ``rate`` (times the halvings so far) from the gradients in place, taken back and
        retried at half the rate while it costs too much; False when the rate may not be halved again (the
        weights are then as before)."""
        weights = [p.detach().clone() for p in self.model.parameters()]
        state = copy.deepcopy(self.optimiser.state_dict())
        for attempt in range(self.config.guard_halvings + 1):
            if attempt:
                self.optimiser.load_state_dict(state)
            _set_rate(self.optimiser, rate * self.factor)
            self.optimiser.step()
            self.now = self.accuracy()
            if self.now >= self.start - self.config.guard_drop:
                return True
            self.refused += 1
            self.factor *= 0.5
            with torch.no_grad():
                for p, w in zip(self.model.parameters(), weights):
                    p.copy_(w)
        self.optimiser.load_state_dict(state)
        self.now = self.accuracy()
        return False


def _set_rate(optimiser: torch.optim.Optimizer, rate: float) -> None:
    for group in optimiser.param_groups:
        group["lr"] = rate


def _descend(optimiser: torch.optim.Optimizer, loss: torch.Tensor, rate: float, step: int, config: TuneConfig) -> None:
    """One optimiser step on ``loss`` at ``rate`` (a repair or consolidation step: no guard, no halving)."""
    _check_finite(loss, step, config)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    _set_rate(optimiser, rate)
    optimiser.step()


def _repair(model: nn.Module, keeper: _Guard, parts: _Parts, config: TuneConfig, gen: torch.Generator,
            device: torch.device, steps: int) -> int:
    """Steps on retained and predicted-easy samples only while the guard set is more than ``guard_drop`` points
    below the guard's level (at most ``guard_repairs``, within ``max_steps``); returns how many were taken."""
    taken = 0
    no_hard = replace(parts, hard=_pick(parts.easy, 0, gen))
    measured = None  # the guard's accuracy under the weights as they are now, once measured
    while taken < config.guard_repairs and steps + taken < config.max_steps:
        measured = keeper.accuracy()
        if measured >= keeper.level - config.guard_drop:
            break
        with _bn_mode(model, config.bn):
            loss, _ = _step_loss(model, no_hard, config, gen, device)
            _descend(keeper.optimiser, loss, config.rate(steps + taken), steps + taken, config)
        taken += 1
        measured = None
    keeper.refused += taken
    keeper.now = keeper.accuracy() if measured is None else measured
    return taken


def _misaligned(model: nn.Module, hard: TuneSet, easy: TuneSet, easy_start: torch.Tensor,
                device: torch.device) -> int:
    """Hard samples still classified correctly plus easy samples correct at the start and wrong now."""
    easy_now, _ = _easy_state(model, easy, device)
    return int(_correct(model, hard, device).sum()) + int((~easy_now & easy_start).sum())


def _consolidate(model: nn.Module, optimiser: torch.optim.Optimizer, parts: _Parts, config: TuneConfig,
                 gen: torch.Generator, device: torch.device, easy_start: torch.Tensor,
                 budget: float) -> tuple[int, int]:
    """``config.consolidate_steps`` steps after the run is aligned, the easy term one-sided, then two-sided steps
    while more than ``budget`` forget samples are misaligned (see the module docstring); returns how many of each
    were taken."""
    for step in range(config.consolidate_steps):
        with _bn_mode(model, config.bn):
            loss, _ = _step_loss(model, parts, config, gen, device, one_sided=True)
            _descend(optimiser, loss, config.lr, step, config)
    realigned = 0
    while (config.realign and realigned < config.consolidate_steps
           and _misaligned(model, parts.hard, parts.easy, easy_start, device) > budget):
        with _bn_mode(model, config.bn):
            loss, _ = _step_loss(model, parts, config, gen, device)
            _descend(optimiser, loss, config.lr, config.consolidate_steps + realigned, config)
        realigned += 1
    return config.consolidate_steps, realigned


def forget_finetune(model: nn.Module, hard: TuneSet, easy: TuneSet, retain: TuneSet | None,
                    config: TuneConfig, device: torch.device, anchor: nn.Module | None = None,
                    guard: TuneSet | None = None, guard_level: float | None = None,
                    held_out: TuneSet | None = None) -> TuneResult:
    """Fine-tune ``model`` in place so that predicted-hard samples are misclassified and easy ones kept.

    Args:
        model: the model to change (a copy of M_o), on ``device``.
        hard: predicted-hard forget samples.
        easy: predicted-easy forget samples.
        retain: retained samples for the optional retain term (None or empty: no retain term).
        config: objective, noise, steps and stopping settings.
        device: where to compute.
        anchor: the original model (eval mode, not trained) for ``retain_loss="kl"``.
        guard: held-out images for ``config.guard_drop`` (no guard when None, empty, or ``guard_drop`` is None).
        guard_level: accuracy (percent) on ``guard`` that ``guard_mode="repair"`` keeps the model within
            ``guard_drop`` of (None: the model's accuracy at the start); ``"halve"`` always uses the start.
        held_out: held-out images with ``reference_logits`` for ``config.held_out_weight`` (None: no such term).

    Raises:
        InvalidInputError: ``held_out`` has no reference logits, or not one row of them an image.

    Returns:
        Steps, stop reason and accuracies before and after; the model ends in eval mode.
    """
    if held_out is not None and (held_out.reference_logits is None
                                 or held_out.reference_logits.shape[0] != held_out.size):
        raise InvalidInputError(f"forget_finetune: the held-out set needs reference logits, one row an image "
                                f"({held_out.size}), got "
                                f"{None if held_out.reference_logits is None else tuple(held_out.reference_logits.shape)}")
    started = time.perf_counter()
    parts = _Parts(hard, easy, retain, held_out, anchor)
    gen, optimiser = generator(config.seed), _optimiser(model, config)
    level = guard_level if config.guard_mode == "repair" else None
    keeper = (_Guard(model, optimiser, guard, config, device, level)
              if guard is not None and guard.size and config.guard_drop is not None else None)
    easy_start = hard_start = None
    steps, reason = 0, "max_steps"
    budget = config.tolerance * (hard.size + easy.size)
    while True:
        with _bn_mode(model, config.bn):
            loss, hard_now = _step_loss(model, parts, config, gen, device)
        _check_finite(loss, steps, config)
        if hard_now is None:
            hard_now = _correct(model, hard, device)
        if easy_start is None:
            hard_start, easy_start = hard_now, _correct(model, easy, device)
        easy_lost = excess = None
        if int(hard_now.sum()) <= budget:  # only then can the rule stop the run: look at the easy samples
            easy_now, excess = _easy_state(model, easy, device)
            easy_lost = int((~easy_now & easy_start).sum())
        logger.debug("forget fine-tune step %d: loss %.4f, hard still correct %d/%d, easy lost %s/%d, excess %s",
                     steps, loss.item(), int(hard_now.sum()), hard.size, "?" if easy_lost is None else easy_lost,
                     easy.size, "?" if excess is None else f"{excess:.2f}")
        if (easy_lost is not None and steps >= config.min_steps and int(hard_now.sum()) + easy_lost <= budget
                and (config.easy_slack is None or excess <= config.easy_slack)):
            reason = "aligned"
            break
        if steps >= config.max_steps:
            break
        with _bn_mode(model, config.bn):
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if keeper is None or config.guard_mode == "repair":
                _set_rate(optimiser, config.rate(steps))
                optimiser.step()
            elif not keeper.step(config.rate(steps)):
                reason = "guard"
                break
        steps += 1
        if keeper is not None and config.guard_mode == "repair":
            steps += _repair(model, keeper, parts, config, gen, device, steps)
    consolidated = realigned = 0
    if reason == "aligned" and config.consolidate_steps and steps:
        consolidated, realigned = _consolidate(model, optimiser, parts, config, gen, device, easy_start, budget)
        hard_now, easy_lost = _correct(model, hard, device), None
        if keeper is not None:
            keeper.now = keeper.accuracy()
    if easy_lost is None:
        easy_now, excess = _easy_state(model, easy, device)
    logger.debug("forget fine-tune: %d steps, stop=%s", steps, reason)
    return TuneResult(steps, reason, _accuracy(hard_start), _accuracy(hard_now), _accuracy(easy_start),
                      _accuracy(easy_now), time.perf_counter() - started,
                      keeper.start if keeper else None, keeper.now if keeper else None,
                      keeper.refused if keeper else 0, keeper.level if keeper else None,
                      excess if easy.margin_target is not None else None, consolidated, realigned)
