"""Options of the ``tmu`` method: one frozen dataclass, validated on construction.

Defaults were chosen on the ``cpu-small`` protocol, seed 0 (CIFAR-10, 500 images a class, small CNN fitted to
its training set, 100 forget samples of cat, ship and automobile) with ``scripts/tune_tmu.py``. The figures
below are means over the three forget sets from the ablation run in BENCHMARKS.md (``tmu-admin evaluate
--protocol cpu-small --methods tmu --variant ...``), where the defaults give Delta 5.0, ACC_Dtest 63.47
(gold 63.87), ASR 53.0 (gold 51.0) and 2.7 s a request. Where the defaults differ from the paper, and why:

- ``df_same_class`` / ``df_normalise`` (the distance feature to retained samples of the same class,
  normalised), ``features`` with ``"prior"`` (the class's easy share in the twin problem), ``clf_members=10``
  (an ensemble of MLPs), ``easy_rule="expected"`` and ``easy_target="held_out"``: together with the paper's
  choices for all five (``features=("df","af","cf")``, plain DF, one MLP, the 0.5 cut, plain CE on easy
  samples) Delta was 11.0 and ASR 68.7.
- ``easy_rule="expected"`` keeps the expected easy count (the sum of the probabilities); the paper's 0.5 cut
  gave Delta 7.0. ``"prior"`` (the count from the class priors) was measured on seed 0's three shapes with the
  unseen test images (BENCHMARKS.md, 2026-12-07): Delta 1.7 / 1.0 / 10.0 (class / random / owner) against
  4.0 / 5.0 / 6.7, at 1.0 more point of test accuracy lost on the class sets (one 2.4 below the gold), so it
  is not the default. Measured again over five seeds with ``prior_shift`` and ``realign`` (BENCHMARKS.md, "A
  held-out anchor", 2026-12-07), it is mixed: class-shape Delta 7.3 against 6.9 on the default twin split (5.9
  against 6.9 on five new splits), random 3.6 against 4.2, owner 5.4 against 5.9; but the per-example attack's
  gap on seed 0's random sets is 0.059 against 0.043 (target 0.05), and on the quickstart's stream of 21
  requests it drifts further below the golds on unseen images (5.4 points at worst against 4.5; on ten
  sequential requests -2.7 against -1.1 on seed 0, -3.9 against -4.5 on seed 1).
- ``prior_shift=True`` (not in the paper): the easy probabilities of a class that the request takes a large share
  of are scaled down by how much that class's held-out easy rate falls when its share of the training set falls as
  the gold's does (``easy_hard.shift_scale``: Bayes' label-shift correction on temperature-scaled twin logits). A
  gold without 100 of a class's 500 samples is 4.4 points less accurate on that class's test images than the
  original (mean of 15 forget classes, seeds 0 to 4); the factor is 1 for random and owner-shaped sets. With
  ``realign`` below, over five seeds (BENCHMARKS.md, "The gold keeps fewer of a forgotten class", 2026-12-07):
  class-shape Delta 9.5 -> 6.9 (floor 3.1) on the default twin split, and 8.9 -> 6.9 on five new twin splits;
  on seed 0 alone 4.0 -> 5.0. The decision came from diagnostics on all five seeds' cached golds, so seeds 1 to 4
  of the default split are not out of sample for it; the new twin splits are.
- ``realign=True`` (not in the paper): when the ``consolidate_steps`` leave a request misaligned (the hinge on a
  class's hard samples can take its easy samples across the boundary: one cat request ended at ACC_Df 24 with 43
  samples predicted easy, gold 45), two-sided steps follow until it is aligned again. Over five seeds, random 1%
  Delta 5.0 -> 4.2 (floor 2.6) and owner batches 7.2 -> 5.9 (floor 7.3); on seed 0 alone 5.0 -> 6.0 and 6.7 ->
  10.0. Class shape: 6.4 without it and 6.9 with it on the default split, 7.9 and 6.9 on the new splits.
- ``features``: the paper's three gave Delta 5.7; single features 7.3 to 12.0.
- ``clf_members=10``: one MLP gave Delta 4.7, within the noise of one seed; the ensemble is kept because it
  averages out the dependence on one MLP's initialisation.
- ``easy_target="held_out"`` (not in the paper): predicted-easy samples are pulled to the logit margin of
  correctly classified held-out samples rather than kept memorised; plain CE gave Delta 4.3 but ASR 62.7.
- ``twin_target_accuracy=None``: the twin fine-tune stops once M_t fits D_test as well as M_o fits its
  training set, so that the two problems' features are comparable.
- The fine-tune runs in eval mode with Adam (lr 3e-4) and a KL term to M_o's outputs on retained batches
  (``retain_weight=10``): in train mode one-class forget batches skew the batch statistics; without the KL
  term ACC_Dtest fell to 48.8.
- ``tolerance=0.03``: the last few memorised hard samples of a class take as many steps as all the others;
  stopping once at most 3% of D_f is misaligned ended the cat request after 58 steps. With ``tolerance=0`` Delta
  was 6.0 and a request 3.5 s.
- ``max_steps=120`` (60 until the lineage reference): a guarded request on a version that drifted below its
  lineage's level spends up to ``guard_repairs`` repair steps after each forget step, and every step counts. With
  60, ten sequential owner requests (seed 0) ran out of steps from the fifth on and under-forgot (Delta 16.6 after
  the tenth, mean 9.5; ACC_Dtest within 2.2 of every gold); with 120, Delta 9.5 after the tenth, mean 4.8, ACC_Dtest
  -0.8 to +3.0 against the golds. On single requests from the original (seed 0) it changed no Delta (random 1%:
  6.0, owner batches: 10.0) and cost 0.6 points of ACC_Dtest (63.8 -> 63.2; 63.7 -> 63.1).
- ``retain_batch=32``, ``easy_batch=32``: a step costs about one forward and backward pass of its images, so
  the batches are kept small (the request times above are with them).
- ``guard_drop=2.0``, ``guard_mode="repair"``, ``guard_repairs=20`` and ``guard_max_samples=32`` (not in the
  paper). On a request of at most ``guard_max_samples`` samples, a fine-tune step that costs more than
  ``guard_drop`` points of accuracy on up to ``guard_size`` held-out twin images (every class) is followed by up to
  ``guard_repairs`` steps on retained and predicted-easy samples only, until the guard set is back. Such a request
  ends within a few steps (its one or two hard samples are aligned after a step), so nothing else repairs what
  they cost: on the CIFAR-10 quickstart's stream of small owner requests (``scripts/bench_stream.py --phase
  replay``, BENCHMARKS.md) ACC_Dtest fell from 62.4 to 46.4 in six requests without a guard (one Adam step on a
  two-sample request cost 12.6 points), and to 60.6 in nine with this one (mean Delta on the union 4.8). The
  earlier guard (``guard_mode="halve"``: take the step back, retry at half the rate, stop when it may not be
  halved again) held ACC_Dtest (61.0) but stopped the forgetting: mean Delta 9.5 on that stream, and on
  ``cpu-small`` owner batches of 15 samples ACC_Df stayed at the original's 100 (Delta 30, gold floor 6.7)
  where repair gives Delta 10 at ACC_Dtest 63.6 (gold 63.2). A 100-sample request runs long enough to repair
  its early steps, and there the halving guard did harm (``cpu-small``'s class requests: ACC_Df 89 / 100 / 97
  against 54 / 73 / 83 unguarded); repair has not been measured there, so larger requests stay unguarded
  (None: guard every request; ``guard_drop=None``: no guard). The drop was 1.0 until the held-out anchor held
  the other twin images; with the anchor, 2.0 takes fewer repair steps for the same forgetting (BENCHMARKS.md,
  "The held-out anchor's weight and reference"): on ``cpu-small``'s owner batches over five seeds the same
  Delta on every set (mean 5.9) at a median request of 7.9 s against 9.4 s; on ten sequential owner requests
  13.5% and 18.6% of the retrains' time against 15.9% and 27.1%, Delta after the tenth 6.0 and 6.0 against 8.0
  and 4.9 (floors 3.0 and 2.5), unseen accuracy within 1.6 points of every gold (seed 2, run after the choice:
  21% against 25%, Delta 0.5 against 1.4, floor 1.4, within 1.8 points); on the replayed quickstart
  stream 218 fine-tune steps against 285, 21 of 22 rows within 2 points of the gold on unseen images (2.3 at
  worst), mean Delta on the union 2.2 against 1.9. Without the guard (``None``) that stream kept 16 of 22 rows
  within 2 points (2.7 at worst).
- ``easy_slack=0.25`` and ``easy_quantile=0.3`` (not in the paper): the fine-tune's stopping rule also waits until
  the predicted-easy samples' mean excess over their target margins is at most 0.25 logits, and the target is the
  0.3 quantile of the held-out margins rather than their median. Before, a 50-sample request stopped after about
  15 steps, once its hard samples were misclassified, with its easy samples still far above their targets: the
  per-example membership test (LiRA, 8 shadows) told D_f from unseen samples at AUC 0.707 against the gold's 0.537.
  On ``cpu-small`` seed 0, random 1% sets (3): LiRA gap 0.170 -> 0.025, Delta 8.0 -> 5.3, ACC_Dtest 63.40 ->
  63.00; owner batches (2): Delta 6.7 -> 3.3; class requests (3): Delta 6.0 -> 6.3, ACC_Dtest 63.60 both; a
  request takes 2 to 3 times as many steps (BENCHMARKS.md). The median with the same slack gave LiRA gap 0.114.
- ``consolidate_steps=60`` (not in the paper): once a request is aligned, 60 more steps in which the easy term is
  one-sided (a margin above its target is pulled down, a sample that turned wrong is pushed back, the rest is left
  alone), so that the KL term pulls back what the forget steps cost elsewhere. Without them a request stopped as
  soon as it was aligned and kept that cost, and the costs of a stream of small requests added up: over the CIFAR-10
  quickstart's 21 owner requests (``scripts/bench_stream.py --phase replay``) TMU alone fell up to 12.2 points below
  the gold on unseen images (at most 5.3 with them; mean Delta 5.1 -> 3.8). On ``cpu-small``'s ten sequential owner requests: seed 0, Delta after the
  tenth 9.5 -> 1.5 (floor 3.0), mean 4.8 -> 2.4, ACC_Dtest within 2.0 of every gold; seed 1 (out of sample),
  ACC_Dtest after the tenth 14.8 -> 3.2 below the gold, mean Delta 8.8 -> 3.6. Random 1% sets (seed 0): Delta
  6.0 -> 4.7, ACC_Dtest 63.20 -> 63.87, LiRA gap 0.026 -> 0.044, request 3.0 -> 5.8 s. Dropping the easy term
  held the stream as well but left the easy samples member-like (LiRA gap 0.171); forcing 60 steps of the full
  objective (``min_steps``) cost 3.8 points of ACC_Dtest on the sequential requests (BENCHMARKS.md).
- ``reference="lineage"`` (not in the paper): the held-out measurements a request compares against (the twin
  samples' correctness, hence the class's easy share; the held-out margins the easy samples are pulled to; the
  guard's level) are those of the version whose state was last built in full, kept through the incremental
  updates after it, instead of being measured again under each approximate version. Measured again, a version's
  own drift became its reference: on ten sequential owner requests (``tmu-admin evaluate --sequential 10
  --forget-shape owner --owners 5``, seed 0) the guard set's accuracy went 69.1 -> 63.3 in steps of less than
  the guard's 1 point, the twin easy rate 64 -> 58, and ACC_Dtest ended 7.4 points below the gold of the union
  (Delta 6.0, floor 3.0). With the lineage's level (and ``max_steps=120``, below) ACC_Dtest stayed between 0.8
  below and 3.0 above every gold (BENCHMARKS.md, "The lineage's held-out reference"). Out of sample (seed 1,
  larger requests, some above ``guard_max_samples``) it did not hold: 14.8 below the gold after the tenth (13.6
  with ``"version"``), mean Delta 8.7 (9.2).
- ``held_out_weight=10`` (not in the paper): every fine-tune step also pulls the model's outputs on the twin images
  the guard does not measure (244 on ``cpu-small``) towards the prepared state's logits on them, which with
  ``reference="lineage"`` are those of the version the last full build was made for (a KL term, weighted like
  ``retain_weight``; the value was set to match it, not tuned). The retain term holds the function on training
  samples, where the model is saturated and a step's cost hardly shows; a stream of small requests loses accuracy
  on images no version was trained on, and this term measures the model there. On the CIFAR-10 quickstart's 21
  owner requests replayed with TMU alone, the largest gap below the golds on 9,500 unseen images went 4.5 -> 2.5
  points (rows within 2 points: 12 -> 20 of 22), the mean Delta on the union 4.1 -> 1.9; through the service with
  the drift budget, 22 of 22 rows within 2 points (largest gap 1.3). Ten sequential owner requests: unseen accuracy
  within -1.4 of every gold on seed 1 (-4.5 without), -0.8 on seed 0 (-1.1), but the mean Delta went 2.9 -> 5.1
  and 3.8 -> 4.1, and the ten requests took 27% and 16% of the retrains' time (15% and 13%). Single requests over
  five seeds: mean Delta within 0.3 of the defaults' on every shape, unseen accuracy closer to the gold's (every
  class set within 2 points, on the default and on five new twin splits), about 3 s more a request
  (BENCHMARKS.md, "A held-out anchor", 2026-12-07). The twin images are held out, so the term keeps nothing a
  forgotten sample was part of (the rule of :func:`tmu_core.unlearn.twin.update_prepared`). Weights 3 and 5 did
  not do better on the ten sequential requests: no weight met both K = 10 targets on seeds 0 and 1 (weight 3:
  Delta after the tenth 6.0 and 3.5, floors 3.0 and 2.5, but unseen accuracy 2.6 below a gold on seed 1; the
  replayed stream 2.8 at worst, 17 of 22 rows within 2).
- ``held_out_reference="lineage"`` (not in the paper): the anchor pulls towards the lineage's logits (the prepared
  state's), not towards those of the model the request starts from (``"version"``). That model has already
  forgotten the earlier requests, but pulling towards it only slows the drift: on the replayed stream the
  unseen accuracy fell 63.8 -> 60.6 (3.9 at worst, 10 of 22 rows within 2), as without an anchor; on the
  sequential seeds it forgot more (mean Delta 3.8 and 3.1 against 4.1 and 5.1) and fell 2.3 below a gold
  (BENCHMARKS.md, "The held-out anchor's weight and reference").
- ``forget_scale=100`` (not in the paper): above 100 forget samples the hard term's weight grows with the request
  (``samples / 100``); up to 100 (every request the defaults above were chosen on) it is 1, and nothing changes.
  The hard term is a batch mean against fixed retain and held-out weights, so a 500-sample request (a random 10%
  of ``cpu-small``'s training set) pushed each hard sample a fifth as hard as a 100-sample one: on seed 0's two
  such sets it ran out of steps with 60% of its hard samples still correct (Delta 18.4 and 24.0, floor 3.0 and
  0.8). With the scale, Delta 0.0 and 5.6 in the same 120 steps, unseen accuracy 1.8 and 1.9 points below the
  gold's (-0.0 and +0.1 without). Scaling the easy term as well cost 2.7 points of unseen accuracy; 400 steps
  without the scale reached Delta 1.0 and 6.4 at four times the request time. Over five seeds (1 to 4 out of
  sample): mean Delta 4.1 (floor 2.3; SCRUB 11.0), unseen accuracy within 2 points of the gold on 8 of 10 sets
  (2.9 below at worst), but the easy samples stay member-like: LiRA gap 0.141 (a second retrain's 0.017)
  (BENCHMARKS.md, "Random 10%").
- ``cf_lr=0.01`` as an absolute value: a tenth of the unlearning fine-tune's rate would leave the
  curriculum model at its random initialisation after two epochs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from tmu_core.errors import InvalidInputError
from tmu_core.unlearn.base import check_choice, check_range
from tmu_core.unlearn.easy_hard import EASY_RULES, ClassifierConfig
from tmu_core.unlearn.features import FEATURE_KINDS
from tmu_core.unlearn.forget_tune import TuneConfig

# Fields that change the prepared state; any other option can change without rebuilding it.
PREPARE_FIELDS = (
    "seed", "twin_epochs", "twin_lr", "twin_batch", "twin_target_accuracy", "twin_retain_mix", "cf_epochs", "cf_lr",
    "cf_subset", "cf_batch", "features", "df_top_n", "df_same_class", "df_normalise", "af_eps", "af_steps", "af_step",
    "log_losses", "clf_epochs", "clf_lr", "clf_batch", "clf_loss", "clf_members", "reference",
)
REFERENCES = ("lineage", "version")


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
        twin_retain_mix: training samples mixed into the twin fine-tune, as a multiple of |D_test| (0 = the
            paper's fine-tune on D_test alone).
        cf_epochs: epochs of the curriculum model (paper: 1 or 2).
        cf_lr: its learning rate.
        cf_subset: fraction of the training set it sees besides D_test (and D_f) (paper: 0.3).
        cf_batch: its batch size.
        reference: where the held-out measurements a request compares against come from (which twin samples
            M_o classifies correctly: the class's easy share, the "prior" feature; M_o's logit margins on them:
            the easy samples' targets; and the guard's level): ``"lineage"`` keeps those of the version the last
            full build was made for through every incremental update after it, ``"version"`` measures them again
            under each version's own model (see :func:`tmu_core.unlearn.twin.update_prepared`). Both are the
            same for a version whose state was built in full.
        incremental_max: how many versions in a row may get their prepared state by an incremental update of
            their parent's (:func:`tmu_core.unlearn.twin.update_prepared`) before a full build; 0 builds every
            version's state from scratch. Not in ``PREPARE_FIELDS``: it decides how the next version's state is
            made, not what this version's state holds for a request, so a job with another value still reuses it.
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
        easy_rule: how probabilities become easy/hard labels: ``"expected"`` keeps the expected easy count
            and labels the most probable samples easy, ``"prior"`` takes that count from the class priors instead,
            ``"threshold"`` is the paper's 0.5 cut (see ``easy_hard.select_easy``).
        easy_target: ``"held_out"`` pulls each predicted-easy sample's logit margin towards the median margin
            M_o gives correctly classified held-out (twin) samples of its class, so that it stays correct but
            stops looking memorised; ``"none"`` is the paper's plain cross-entropy on easy samples.
        easy_quantile: which quantile of those held-out margins is the target (0.5: the median).
        prior_shift: scale each forget sample's easy probability by how much its class's held-out easy rate falls
            when the classes' shares of the training set change as the gold's do (see
            ``easy_hard.shift_scale``); False: the rates as measured.
        lr, max_steps, min_steps, tolerance, hard_objective, margin, ascent_cap, easy_weight, noise_std,
            retain_weight, retain_loss, retain_batch, batch_size, easy_batch, optimizer, bn, guard_drop,
            guard_halvings, guard_mode, guard_repairs, warmup_steps, easy_slack, consolidate_steps, realign,
            held_out_weight, forget_scale: the unlearning fine-tune (see :class:`TuneConfig`); TMU's held-out anchor
            images are the twin images its guard does not measure.
        held_out_reference: the logits the held-out anchor pulls towards: ``"lineage"``, the prepared state's
            (with ``reference="lineage"`` those of the version the last full build was made for), or
            ``"version"``, those of the model the request starts from.
        guard_size: twin images the fine-tune's guard measures (a seeded sample of D_test; all when fewer).
        guard_max_samples: the largest request the guard watches (None: every request).
    """

    seed: int = 0
    twin_epochs: int = 10
    twin_lr: float = 0.01
    twin_batch: int = 64
    twin_target_accuracy: float | None = None
    twin_retain_mix: float = 0.0
    cf_epochs: int = 2
    cf_lr: float = 0.01
    cf_subset: float = 0.3
    cf_batch: int = 64
    cf_per_request: bool = False
    reference: str = "lineage"
    incremental_max: int = 20
    features: tuple[str, ...] = FEATURE_KINDS
    df_top_n: int = 5
    df_same_class: bool = True
    df_normalise: bool = True
    af_eps: float = 4 / 255
    af_steps: int = 5
    af_step: float | None = None
    log_losses: bool = True
    clf_epochs: int = 100
    clf_lr: float = 0.01
    clf_batch: int = 32
    clf_loss: str = "bce"
    clf_members: int = 10
    easy_rule: str = "expected"
    easy_target: str = "held_out"
    easy_quantile: float = 0.3
    prior_shift: bool = True
    # The fine-tune's settings; their defaults are TuneConfig's.
    lr: float = TuneConfig.lr
    max_steps: int = 120
    min_steps: int = TuneConfig.min_steps
    tolerance: float = TuneConfig.tolerance
    hard_objective: str = TuneConfig.hard_objective
    margin: float = TuneConfig.margin
    ascent_cap: float = TuneConfig.ascent_cap
    easy_weight: float = TuneConfig.easy_weight
    noise_std: float = TuneConfig.noise_std
    retain_weight: float = TuneConfig.retain_weight
    retain_loss: str = TuneConfig.retain_loss
    retain_batch: int = TuneConfig.retain_batch
    batch_size: int = TuneConfig.batch_size
    easy_batch: int = TuneConfig.easy_batch
    optimizer: str = TuneConfig.optimizer
    bn: str = TuneConfig.bn
    guard_drop: float | None = 2.0
    guard_halvings: int = TuneConfig.guard_halvings
    guard_mode: str = "repair"
    guard_repairs: int = 20
    warmup_steps: int = TuneConfig.warmup_steps
    easy_slack: float | None = 0.25
    consolidate_steps: int = 60
    realign: bool = TuneConfig.realign
    held_out_weight: float = 10.0
    held_out_reference: str = "lineage"
    guard_size: int = 256
    guard_max_samples: int | None = 32
    forget_scale: int | None = 100

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
        check_range(owner, "easy_quantile", self.easy_quantile, 0.0, 1.0)
        check_range(owner, "incremental_max", self.incremental_max, 0)
        check_range(owner, "guard_size", self.guard_size, 1)
        if self.guard_max_samples is not None:
            check_range(owner, "guard_max_samples", self.guard_max_samples, 1)
        check_range(owner, "twin_retain_mix", self.twin_retain_mix, 0.0)
        if self.af_step is not None:
            check_range(owner, "af_step", self.af_step, 0.0, low_open=True)
        check_choice(owner, "clf_loss", self.clf_loss, ("bce", "ce"))
        check_choice(owner, "easy_rule", self.easy_rule, EASY_RULES)
        check_choice(owner, "easy_target", self.easy_target, ("none", "held_out"))
        check_choice(owner, "reference", self.reference, REFERENCES)
        check_choice(owner, "held_out_reference", self.held_out_reference, REFERENCES)
        self.classifier_config()
        self.tune_config()

    def classifier_config(self) -> ClassifierConfig:
        """The easy/hard MLP settings (validated)."""
        return ClassifierConfig(epochs=self.clf_epochs, lr=self.clf_lr, batch_size=self.clf_batch,
                                loss=self.clf_loss, members=self.clf_members, seed=self.seed + 4)

    def tune_config(self) -> TuneConfig:
        """The unlearning fine-tune settings (validated)."""
        names = [f.name for f in fields(TuneConfig) if f.name != "seed"]
        return TuneConfig(seed=self.seed + 5, **{name: getattr(self, name) for name in names})

    def prepare_key(self) -> str:
        """JSON of the options that shape the prepared state."""
        values = asdict(self)
        return json.dumps({name: values[name] for name in PREPARE_FIELDS}, sort_keys=True)
