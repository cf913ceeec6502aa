"""The easy/hard (generalisation-label) classifier of TMU (paper sections 3.3 and 4.1.1).

An MLP with hidden layers 64 and 32 and ReLU, trained with SGD (lr 0.01, momentum 0.9, weight decay 5e-4)
for 100 epochs on the twin problem's features, standardised with the twin problem's own statistics.
Label 1 = easy (the gold model classifies the sample correctly), 0 = hard. The easy probability is averaged
over an ensemble of such MLPs (``members``; 1 is the paper's single MLP).

Three rules turn probabilities into labels (``select_easy``):

- ``"threshold"``: easy when the probability is at least 0.5 (the paper's rule);
- ``"expected"``: the expected number of easy samples, k = round(sum of probabilities), is kept, and the k
  most probable samples are labelled easy. Thresholding pushes a group's easy share towards 0 or 1 (a
  hundred samples each at 0.7 all become easy), while the sum of calibrated probabilities is an unbiased
  count ("probabilistic classify and count" in the quantification literature). TMU aligns the forget set's
  accuracy with that share, so the count matters more than any one label.
- ``"prior"``: the count is the sum of each sample's class prior instead (the share of its class's held-out
  twin images the model classifies correctly: how many of them a model that never saw them would get right, if
  they were like held-out images), and the most probable samples are again labelled easy. The classifier then
  only ranks; its calibration, learnt on held-out images, need not carry over to training samples.

With ``scale`` (:func:`shift_scale`), each sample's probability and prior are first multiplied by its class's
factor. The twin images measure a model trained on the whole training set; the gold model was trained without
D_f, so a class that loses a large part of its samples is predicted less often by it. Bayes' rule gives the size
of that: a class whose share of the training set changes by a factor w has its log posterior moved by log w
(label or prior-probability shift, Saerens et al. 2002). ``shift_scale`` applies that move to M_o's logits on the
twin images, calibrated by one temperature fitted on them (Guo et al. 2017), and returns each class's easy rate
after the move divided by its rate before. When every class loses the same share (a random forget set), or a
few samples of a class among hundreds (an owner), the factors are 1 or next to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tmu_core.device import generator
from tmu_core.errors import InvalidInputError
from tmu_core.unlearn.base import check_choice, check_range

logger = logging.getLogger(__name__)

LOSSES = ("bce", "ce")
EASY_RULES = ("threshold", "expected", "prior")


@dataclass(frozen=True)
class ClassifierConfig:
    """How the easy/hard MLP is built and trained.

    Attributes:
        hidden: widths of the hidden layers.
        epochs: passes over the twin problem's samples.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        batch_size: samples per step.
        loss: ``"bce"`` (one logit, the public code's choice) or ``"ce"`` (two logits).
        members: independently initialised and shuffled MLPs trained side by side; their easy
            probabilities are averaged (one MLP on ~500 twin samples swings with its seed).
        seed: initialisation and shuffles.
    """

    hidden: tuple[int, ...] = (64, 32)
    epochs: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    loss: str = "bce"
    members: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if not self.hidden or min(self.hidden) < 1:
            raise InvalidInputError(f"ClassifierConfig: hidden must be positive widths, got {self.hidden}")
        check_range("ClassifierConfig", "epochs", self.epochs, 1)
        check_range("ClassifierConfig", "lr", self.lr, 0.0, low_open=True)
        check_range("ClassifierConfig", "momentum", self.momentum, 0.0, 1.0)
        check_range("ClassifierConfig", "weight_decay", self.weight_decay, 0.0)
        check_range("ClassifierConfig", "batch_size", self.batch_size, 1)
        check_range("ClassifierConfig", "members", self.members, 1)
        check_choice("ClassifierConfig", "loss", self.loss, LOSSES)


class EasyHardMLP(nn.Module):
    """``members`` MLPs with the same shape, stored as stacked weights; standardisation stats as buffers.

    Each member is ``Linear -> ReLU -> ... -> Linear`` with PyTorch's default ``nn.Linear`` initialisation.
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], outputs: int, members: int = 1) -> None:
        super().__init__()
        sizes = (in_features, *hidden, outputs)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / fan_in ** 0.5
            self.weights.append(nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound)))
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))

    @property
    def shape(self) -> dict[str, int | list[int]]:
        """What rebuilds this module: in_features, hidden, outputs, members."""
        widths = [w.shape[2] for w in self.weights]
        return {"in_features": int(self.weights[0].shape[1]), "hidden": widths[:-1], "outputs": widths[-1],
                "members": int(self.weights[0].shape[0])}

    def member_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Raw logits (E, N, outputs) of each member; ``features`` is (N, F) or per member (E, N, F)."""
        x = (features - self.mean) / self.std
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.weights[0].shape[0], -1, -1)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias, x, weight)
            if layer < len(self.weights) - 1:
                x = torch.relu(x)
        return x

    def easy_probability(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) probability that each sample is easy, averaged over the members."""
        logits = self.member_logits(features)
        probs = torch.sigmoid(logits[..., 0]) if logits.shape[-1] == 1 else F.softmax(logits, dim=-1)[..., 1]
        return probs.mean(dim=0)


def _loss(logits: torch.Tensor, easy: torch.Tensor) -> torch.Tensor:
    """Sum over members of each member's mean loss; logits (E, B, outputs), easy (E, B)."""
    if logits.shape[-1] == 1:
        per = F.binary_cross_entropy_with_logits(logits[..., 0], easy.float(), reduction="none")
    else:
        per = F.cross_entropy(logits.flatten(0, 1), easy.long().flatten(), reduction="none").view(easy.shape)
    return per.mean(dim=1).sum()


def fit_classifier(features: torch.Tensor, easy: torch.Tensor, config: ClassifierConfig) -> EasyHardMLP:
    """Train the easy/hard MLP ensemble on the twin problem.

    Every member has its own initialisation and its own shuffle; they are trained in one batched pass,
    which equals (up to floating-point rounding) training them one after the other.

    Args:
        features: (N, F) raw features of the twin problem's samples.
        easy: (N,) bool or 0/1 generalisation labels (1 = easy).
        config: architecture and training settings.

    Returns:
        The trained classifier in eval mode, on the features' device, with the standardisation stats inside.

    Raises:
        InvalidInputError: shapes do not match or fewer than two samples.
    """
    if features.dim() != 2 or easy.shape != (features.shape[0],):
        raise InvalidInputError(
            f"fit_classifier: expected (N, F) features and (N,) labels, got {tuple(features.shape)} and {tuple(easy.shape)}"
        )
    if features.shape[0] < 2:
        raise InvalidInputError(f"fit_classifier: needs at least 2 twin samples, got {features.shape[0]}")
    device, n = features.device, features.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        clf = EasyHardMLP(features.shape[1], config.hidden, 1 if config.loss == "bce" else 2, config.members)
    clf = clf.to(device)
    clf.mean.copy_(features.mean(dim=0))
    clf.std.copy_(features.std(dim=0).clamp_min(1e-6))
    optimiser = torch.optim.SGD(clf.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    gens = [generator(config.seed * 1000 + member) for member in range(config.members)]
    easy = easy.to(device)
    clf.train()
    for _ in range(config.epochs):
        orders = torch.stack([torch.randperm(n, generator=gen) for gen in gens]).to(device)  # (E, N)
        for start in range(0, n, config.batch_size):
            rows = orders[:, start:start + config.batch_size]  # (E, B)
            loss = _loss(clf.member_logits(features[rows]), easy[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    clf.eval()
    return clf


def predict_easy(clf: EasyHardMLP, features: torch.Tensor, rule: str = "threshold",
                 prior: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) bool: the classifier's easy labels of ``features`` by ``rule`` (``prior``: each sample's class prior,
    for the ``"prior"`` rule; ``scale``: each sample's class factor from :func:`shift_scale`)."""
    with torch.inference_mode():
        return select_easy(clf.easy_probability(features.to(clf.mean.device)), rule, prior, scale)


def select_easy(probability: torch.Tensor, rule: str = "threshold", prior: torch.Tensor | None = None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) bool easy labels from (N,) easy probabilities by ``rule`` (see the module docstring), after
    multiplying the probabilities and priors by ``scale`` (N,) when given.

    Raises:
        InvalidInputError: an unknown rule, ``"prior"`` without an (N,) ``prior``, or a ``scale`` of another shape.
    """
    check_choice("select_easy", "rule", rule, EASY_RULES)
    if scale is not None:
        if scale.shape != probability.shape:
            raise InvalidInputError(f"select_easy: scale must have one factor a sample ({tuple(probability.shape)}), "
                                    f"got {tuple(scale.shape)}")
        scale = scale.to(probability.device)
        probability = (probability * scale).clamp(0.0, 1.0)
        prior = None if prior is None else (prior.to(probability.device) * scale).clamp(0.0, 1.0)
    if rule == "threshold":
        return probability >= 0.5
    if rule == "prior" and (prior is None or prior.shape != probability.shape):
        raise InvalidInputError(f"select_easy: rule 'prior' needs one class prior a sample ({tuple(probability.shape)}), "
                                f"got {None if prior is None else tuple(prior.shape)}")
    expected = prior.to(probability.device) if rule == "prior" else probability
    count = int(torch.round(expected.sum()).item())
    order = torch.sort(probability, descending=True, stable=True).indices
    easy = torch.zeros_like(probability, dtype=torch.bool)
    easy[order[:count]] = True
    return easy


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 whose ``softmax(logits / T)`` has the least cross-entropy on ``labels`` (temperature
    scaling), searched on a log grid from 0.1 to 20: ``logits`` (N, K) of held-out samples, ``labels`` (N,).

    Raises:
        InvalidInputError: shapes do not match or there is no sample.
    """
    if logits.dim() != 2 or labels.shape != (logits.shape[0],) or not labels.numel():
        raise InvalidInputError(f"fit_temperature: expected (N, K) logits and (N,) labels with N > 0, "
                                f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    logits, labels = logits.detach().float().cpu(), labels.cpu().long()
    grid = torch.logspace(-1.0, 1.30103, 241)  # 0.1 .. 20, about 1.3% apart
    losses = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    return float(grid[int(losses.argmin())])


def shift_scale(twin_logits: torch.Tensor, twin_labels: torch.Tensor,
                kept_share: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per class, how much its easy rate on the twin images falls when each class's share of the training set is
    multiplied by ``kept_share`` (see the module docstring).

    Args:
        twin_logits: (T, K) the model's logits on the twin (held-out) images.
        twin_labels: (T,) their labels.
        kept_share: (K,) per class, the number of its training samples the gold keeps divided by the number the
            model was trained on (1 for a class that loses nothing; 0 for a class forgotten whole).

    Returns:
        ``factors`` (K,): each class's easy rate after the shift divided by its rate before (1 for a class with
        no correctly classified twin image), and the fitted temperature.

    Raises:
        InvalidInputError: shapes do not match.
    """
    classes = twin_logits.shape[-1] if twin_logits.dim() == 2 else 0
    if kept_share.shape != (classes,):
        raise InvalidInputError(f"shift_scale: expected one kept share a class ({classes}), "
                                f"got {tuple(kept_share.shape)}")
    temperature = fit_temperature(twin_logits, twin_labels)
    logits, labels = twin_logits.detach().float().cpu(), twin_labels.cpu().long()
    before = logits.argmax(dim=1) == labels
    after = (logits / temperature + kept_share.float().clamp_min(1e-6).log()).argmax(dim=1) == labels
    correct = torch.zeros(classes).index_add_(0, labels, before.float())
    kept = torch.zeros(classes).index_add_(0, labels, after.float())
    factors = torch.where(correct > 0, kept / correct.clamp_min(1.0), torch.ones(classes))
    return factors, temperature


def label_accuracy(predicted_easy: torch.Tensor, true_easy: torch.Tensor) -> float:
    """ACC_gl in percent: how often the predicted generalisation label equals the true one."""
    if predicted_easy.shape != true_easy.shape or predicted_easy.numel() == 0:
        raise InvalidInputError(
            f"label_accuracy: expected two equal non-empty shapes, got {tuple(predicted_easy.shape)} and {tuple(true_easy.shape)}"
        )
    return 100.0 * (predicted_easy.bool().cpu() == true_easy.bool().cpu()).float().mean().item()
