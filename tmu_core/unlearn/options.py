"""Options of the ``tmu`` method: one frozen dataclass, validated on construction.

Defaults were chosen on the ``cpu-small`` protocol (CIFAR-10, 500 images a class, small CNN fitted to its
training set); ``scripts/tune_tmu.py`` reproduces the measurements.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from tmu_core.errors import InvalidInputError
from tmu_core.unlearn.base import check_choice, check_range
from tmu_core.unlearn.easy_hard import ClassifierConfig
from tmu_core.unlearn.features import FEATURE_KINDS
from tmu_core.unlearn.forget_tune import TuneConfig

# Fields that change the prepared state; any other option can change without rebuilding it.
PREPARE_FIELDS = (
    "seed", "twin_epochs", "twin_lr", "twin_batch", "twin_target_accuracy", "cf_epochs", "cf_lr", "cf_subset",
    "cf_batch", "features", "df_top_n", "df_same_class", "df_normalise", "af_eps", "af_steps", "af_step",
    "log_losses", "clf_epochs", "clf_lr", "clf_batch", "clf_loss", "clf_members",
)


@dataclass(frozen=True)
class TmuOptions:
    """Everything TMU can be told.

    Attributes:
        seed: seeds every random choice (subsets, initialisations, shuffles, noise).
        twin_epochs: most epochs of fine-tuning M_o on D_test to make the twin model M_t.
        twin_lr: learning rate of that fine-tune.
        twin_batch: its batch size.
        twin_target_accuracy: stop the twin fine-tune once M_t's accuracy on D_test reaches this fraction;
            None (default) matches M_o's accuracy on its own training set, so that M_t fits D_test as M_o
            fits D_f.
        cf_epochs: epochs of the curriculum model (paper: 1 or 2).
        cf_lr: its learning rate.
        cf_subset: fraction of the training set it sees besides D_test (and D_f) (paper: 0.3).
        cf_batch: its batch size.
        cf_per_request: retrain the curriculum model for each request on D_f + D_test + cf_subset of D_r and
            refit the classifier (the paper's setting); False uses the prepared one (cheaper).
        features: which of ``"df"``, ``"af"``, ``"cf"`` (the paper's) and ``"prior"`` (the class's easy share
            in the twin problem, see :mod:`tmu_core.unlearn.features`) feed the classifier.
        df_top_n: nearest neighbours in the distance feature.
        df_same_class: compare only with retained samples of the same class.
        df_normalise: L2-normalise penultimate features before measuring distances.
        af_eps: PGD budget in [0, 1] pixel units.
        af_steps: PGD steps.
        af_step: PGD step size (None: af_eps / 4).
        log_losses: feed log(AF) and log(CF) instead of the raw cross-entropies.
        clf_epochs, clf_lr, clf_batch, clf_loss: the easy/hard MLP's training (``"bce"`` or ``"ce"``).
        clf_members: MLPs in the classifier ensemble (1 = the paper's single MLP).
        lr, max_steps, min_steps, hard_objective, margin, ascent_cap, easy_weight, noise_std, retain_weight, retain_loss,
            retain_batch, batch_size, optimizer, bn: the unlearning fine-tune (see :class:`TuneConfig`).
    """

    seed: int = 0
    twin_epochs: int = 10
    twin_lr: float = 0.01
    twin_batch: int = 64
    twin_target_accuracy: float | None = None
    cf_epochs: int = 2
    cf_lr: float = 0.01
    cf_subset: float = 0.3
    cf_batch: int = 64
    cf_per_request: bool = False
    features: tuple[str, ...] = FEATURE_KINDS
    df_top_n: int = 5
    df_same_class: bool = False
    df_normalise: bool = False
    af_eps: float = 4 / 255
    af_steps: int = 5
    af_step: float | None = None
    log_losses: bool = True
    clf_epochs: int = 100
    clf_lr: float = 0.01
    clf_batch: int = 32
    clf_loss: str = "bce"
    clf_members: int = 10
    lr: float = 1e-3
    max_steps: int = 30
    min_steps: int = 0
    hard_objective: str = "margin"
    margin: float = 1.0
    ascent_cap: float = 4.0
    easy_weight: float = 1.0
    noise_std: float = 8.0
    retain_weight: float = 5.0
    retain_loss: str = "kl"
    retain_batch: int = 64
    batch_size: int = 256
    optimizer: str = "sgd"
    bn: str = "frozen"

    def __post_init__(self) -> None:
        owner = "tmu"
        kinds = (self.features,) if isinstance(self.features, str) else tuple(self.features)
        object.__setattr__(self, "features", kinds)
        bad = [kind for kind in kinds if kind not in FEATURE_KINDS]
        if not kinds or bad or len(set(kinds)) != len(kinds):
            raise InvalidInputError(
                f"tmu: features must be a non-empty, duplicate-free subset of {', '.join(FEATURE_KINDS)}, got {list(kinds)}"
            )
        for name in ("twin_epochs", "twin_batch", "cf_epochs", "cf_batch", "df_top_n", "af_steps"):
            check_range(owner, name, getattr(self, name), 1)
        for name in ("twin_lr", "cf_lr", "af_eps"):
            check_range(owner, name, getattr(self, name), 0.0, low_open=True)
        if self.twin_target_accuracy is not None:
            check_range(owner, "twin_target_accuracy", self.twin_target_accuracy, 0.0, 1.0)
        check_range(owner, "cf_subset", self.cf_subset, 0.0, 1.0)
        if self.af_step is not None:
            check_range(owner, "af_step", self.af_step, 0.0, low_open=True)
        check_choice(owner, "clf_loss", self.clf_loss, ("bce", "ce"))
        self.classifier_config()
        self.tune_config()

    def classifier_config(self) -> ClassifierConfig:
        """The easy/hard MLP settings (validated)."""
        return ClassifierConfig(epochs=self.clf_epochs, lr=self.clf_lr, batch_size=self.clf_batch,
                                loss=self.clf_loss, members=self.clf_members, seed=self.seed + 4)

    def tune_config(self) -> TuneConfig:
        """The unlearning fine-tune settings (validated)."""
        names = ("lr", "max_steps", "min_steps", "hard_objective", "margin", "ascent_cap", "easy_weight",
                 "noise_std", "retain_weight", "retain_loss", "retain_batch", "batch_size", "optimizer", "bn")
        return TuneConfig(seed=self.seed + 5, **{name: getattr(self, name) for name in names})

    def prepare_key(self) -> str:
        """JSON of the options that shape the prepared state."""
        values = asdict(self)
        return json.dumps({name: values[name] for name in PREPARE_FIELDS}, sort_keys=True)
