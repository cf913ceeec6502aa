"""Training recipe and the results of a training run."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from tmu_core.errors import InvalidInputError

if TYPE_CHECKING:
    from tmu_core.models import Classifier
    from tmu_core.train.checkpoint import CheckpointMeta


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum and a step schedule, as in the paper (lr /10 at 50% and 75% of the epochs).

    Attributes:
        epochs: passes over the training set.
        batch_size: images per step.
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        milestones: fractions of ``epochs`` after which the learning rate is multiplied by ``gamma``.
        gamma: learning-rate factor at each milestone.
        augment: random crop (zero padding of ``crop_padding`` pixels) and horizontal flip, per batch.
        crop_padding: padding for the random crop; ``None`` means ``image_size // 8`` (4 for 32x32), at least 1.
        seed: seeds the model initialisation, the shuffles and the augmentation.
        deterministic: ask torch for deterministic kernels (same seed, same device type -> same weights).
        label_smoothing: cross-entropy label smoothing in [0, 1).
        amp: bfloat16 autocast on CUDA; ignored on the CPU.
    """

    epochs: int
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    augment: bool = True
    crop_padding: int | None = None
    seed: int = 0
    deterministic: bool = False
    label_smoothing: float = 0.0
    amp: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 2)
        _check_int("seed", self.seed, 0)
        if self.crop_padding is not None:
            _check_int("crop_padding", self.crop_padding, 1)
        _check_range("lr", self.lr, 0.0, None, low_open=True)
        _check_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0, None)
        _check_range("gamma", self.gamma, 0.0, 1.0, low_open=True)
        _check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        if any(not 0.0 < m < 1.0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise InvalidInputError(
                f"milestones must be increasing fractions of the epochs in (0, 1), got {self.milestones}"
            )

    @classmethod
    def paper(cls, **overrides: Any) -> "TrainConfig":
        """The paper's schedule: 200 epochs, lr 0.01, /10 after epochs 100 and 150."""
        return cls(**{"epochs": 200, **overrides})

    @classmethod
    def short(cls, epochs: int = 30, **overrides: Any) -> "TrainConfig":
        """The same recipe on a shorter schedule (milestones scale with the epochs)."""
        return cls(epochs=epochs, **overrides)

    @classmethod
    def from_dict(cls, recipe: dict[str, Any]) -> "TrainConfig":
        """Rebuild a config from ``asdict(cfg)`` (for example a checkpoint's ``meta.recipe``).

        Raises:
            InvalidInputError: unknown keys or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise InvalidInputError(f"unknown training recipe keys {unknown}; accepted: {sorted(known)}")
        return cls(**recipe)

    def milestone_epochs(self) -> list[int]:
        """The epochs (0-based, after which) the learning rate drops, e.g. [100, 150] for 200 epochs."""
        drops = {max(1, round(m * self.epochs)) for m in self.milestones}
        return sorted(e for e in drops if e < self.epochs)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_range(
    name: str, value: object, low: float, high: float | None, low_open: bool = False, high_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open or high is None else "]")
        raise InvalidInputError(f"{name} must be in {lo}{low}, {high if high is not None else 'inf'}{hi}, got {value}")


@dataclass(frozen=True)
class TrainHistory:
    """Per-epoch record of a run.

    Attributes:
        loss: mean training loss of each epoch.
        train_acc: running training accuracy (percent, on the augmented batches, in train mode).
        eval_acc: accuracy (percent) on the evaluation set after each epoch; empty without one.
        lr: learning rate used in each epoch.
        seconds: wall time of the whole run.
    """

    loss: tuple[float, ...]
    train_acc: tuple[float, ...]
    eval_acc: tuple[float, ...]
    lr: tuple[float, ...]
    seconds: float

    @property
    def epochs(self) -> int:
        return len(self.loss)


@dataclass(frozen=True)
class TrainResult:
    """A trained model (in eval mode, on the training device), its checkpoint metadata and its history."""

    model: "Classifier"
    meta: "CheckpointMeta"
    history: TrainHistory
