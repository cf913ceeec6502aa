"""Evaluation protocols: what data, which model and recipe, which forget sets and which methods.

Built-in protocols:

- ``digits-tiny``: scikit-learn's bundled digits (8x8 greyscale), ``small_cnn``; a smoke run of about a minute.
- ``cpu-small``: a CIFAR-10 subset (500 training and 100 test images a class) from the JPEG zip, ``small_cnn``,
  100 forget samples from each of cat (3), ship (8) and automobile (1); every method; sized for a 2-core CPU.
- ``cpu-photo``: 100 training and 60 test CIFAR-10 images a class read through a 48 px ``Preprocess``, a
  torchvision ``resnet18`` (the path of an imported model), forget class cat; sized for a 2-core CPU.
- ``paper``: full CIFAR-10, ``resnet18``, the paper's 200-epoch recipe, 100 forget samples from each of the
  10 classes; every method; meant for a GPU.

The test split is cut in two, per class: the twin part (``UnlearnData.twin_ids``, used by TMU's twin problem)
and the eval part, which no method ever sees; ACC_Dtest and the membership attack's non-members use the eval part.

Every built-in protocol forgets samples of one class per experiment (forget shape ``class``); ``forget_shape``
``random`` forgets a fraction of the training set over all classes and ``owner`` one owner or a batch of owners of
a synthetic owner map, ``experiments`` forget sets per seed (default: as many as there are forget classes).

Every protocol scores membership with the population loss-threshold attack (``mia="population"``); ``mia="lira"``
adds the per-example LiRA test (:mod:`tmu_core.evaluate.lira`) at the cost of ``lira_shadows`` more trainings per
seed, cached like the other models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tmu_core.errors import InvalidInputError
from tmu_core.evaluate.lira import MIA_KINDS, check_shadow_count
from tmu_core.evaluate.splits import FORGET_SHAPES
from tmu_core.preprocess import Preprocess
from tmu_core.train import TrainConfig
from tmu_core.unlearn import get_method, parse_method_spec
from tmu_core.unlearn.features import FEATURE_KINDS

SOURCE_KINDS = ("cifar10-zip", "digits")
FEATURES = FEATURE_KINDS
_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CIFAR_ZIP = _REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"
ALL_METHODS = ("retrain", "finetune", "neg_grad", "random_label", "bad_teacher", "fisher", "scrub", "neg_grad_plus",
               "salun", "l1_sparse", "tmu")


@dataclass(frozen=True)
class DataSource:
    """Where the images come from and how many of each class to take.

    Attributes:
        kind: ``"cifar10-zip"`` (the ImageFolder JPEG zip) or ``"digits"`` (scikit-learn's digits).
        path: the zip file for ``cifar10-zip``; unused for ``digits``.
        train_per_class: training images per class; ``None`` takes all.
        test_per_class: test images per class; ``None`` takes all.
        image_size: the models' input side: every image is read through ``Preprocess(image_size, resize)``, as
            a model version with that preprocessing reads the index; ``None`` reads the stored pixels.
        resize: the shorter side before the centre crop (``None``: ``image_size``).
    """

    kind: str
    path: str | None = None
    train_per_class: int | None = None
    test_per_class: int | None = None
    image_size: int | None = None
    resize: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise InvalidInputError(f"unknown data source kind {self.kind!r}; accepted: {', '.join(SOURCE_KINDS)}")
        if self.kind == "cifar10-zip" and not self.path:
            raise InvalidInputError("data source cifar10-zip needs a path to the zip file")
        for name in ("train_per_class", "test_per_class"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise InvalidInputError(f"{name} must be an integer >= 2 or None (all), got {value!r}")
        if self.resize is not None and self.image_size is None:
            raise InvalidInputError("resize needs image_size")
        if self.image_size is not None:
            self.preprocess(3)  # checks the values

    def preprocess(self, channels: int) -> Preprocess | None:
        """The models' preprocessing, or None when they read the stored pixels."""
        if self.image_size is None:
            return None
        return Preprocess(size=self.image_size, resize=self.resize, channels=channels)

    def key(self) -> str:
        """A short cache key of the index: kind, resolved path, file size and counts (not the preprocessing)."""
        size = Path(self.path).stat().st_size if self.path and Path(self.path).is_file() else None
        text = json.dumps([self.kind, str(Path(self.path).resolve()) if self.path else None, size,
                           self.train_per_class, self.test_per_class])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a registered method and its options.

    Attributes:
        label: the row name (unique within a protocol), e.g. ``"tmu"`` or ``"tmu[noise=3]"``.
        name: the registry name passed to ``tmu_core.unlearn.get_method``.
        options: keyword options of that method.
    """

    label: str
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Protocol:
    """A full evaluation recipe; validated on construction.

    Attributes:
        name: protocol name (shown in the table).
        source: the data.
        arch: model architecture (``tmu_core.models`` registry name).
        train: recipe of the original, gold and floor models; its ``seed`` is replaced per run.
        forget_classes: classes to draw a forget set from, one experiment each (``class`` shape); for the other
            shapes their number is the default number of experiments.
        forget_size: forget samples per class (``class`` shape).
        forget_shape: how forget sets are drawn: ``class`` (``forget_size`` samples of one class),
            ``random`` (``forget_fraction`` of the training set over all classes) or ``owner`` (``owners``
            owners of a synthetic owner map of 1 to 20 samples each); see ``splits.draw_forget_sets``.
        forget_fraction: share of the training set each ``random`` experiment forgets.
        owners: owners per ``owner`` experiment (a merged batch of requests when above 1).
        experiments: forget sets per seed for the ``random`` and ``owner`` shapes (``None``: one per entry of
            ``forget_classes``); the ``class`` shape runs one per forget class and takes no other count.
        seeds: seeds of the original model and of the forget-set draws; one full run per seed.
        methods: the methods (rows) to run.
        twin_fraction: share of each class's test images given to the twin part; the rest is the eval part.
        split_seed: seed of the twin/eval split.
        mia_alpha: quantile of non-member losses used as the attack threshold (its false-positive rate).
        mia: membership test: ``population`` (the loss-threshold attack alone) or ``lira`` (that attack and the
            per-example LiRA test against shadow models: AUC and TPR at 1% and 5% FPR on every row).
        lira_shadows: shadow models per seed for ``lira``: an even number >= 4 (complementary pairs).
        wide_test: also score every row's ACC on all of the zip's test images except the twin part
            (``acc_wide``; ``cifar10-zip`` sources only): about 9,500 unseen images for CIFAR-10, where the eval
            split of ``test_per_class`` images a class gives a gap of 2 points between two models a few points
            of sampling noise.
        floor_seed_offset: the floor gold uses seed ``seed + floor_seed_offset``.
        eval_batch_size: batch size of inference.
    """

    name: str
    source: DataSource
    arch: str
    train: TrainConfig
    forget_classes: tuple[int, ...]
    forget_size: int
    forget_shape: str = "class"
    forget_fraction: float = 0.01
    owners: int = 1
    experiments: int | None = None
    seeds: tuple[int, ...] = (0,)
    methods: tuple[MethodSpec, ...] = ()
    twin_fraction: float = 0.5
    split_seed: int = 0
    mia_alpha: float = 0.5
    floor_seed_offset: int = 1000
    eval_batch_size: int = 512
    mia: str = "population"
    lira_shadows: int = 8
    wide_test: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "forget_classes", tuple(self.forget_classes))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "methods", tuple(self.methods))
        _check_ints("forget_classes", self.forget_classes, 0)
        _check_ints("seeds", self.seeds, 0)
        _check_ints("forget_size", (self.forget_size,), 1)
        _check_shape(self)
        _check_ints("floor_seed_offset", (self.floor_seed_offset,), 1)
        _check_ints("eval_batch_size", (self.eval_batch_size,), 1)
        if not 0.0 < self.twin_fraction < 1.0:
            raise InvalidInputError(f"twin_fraction must be in (0, 1), got {self.twin_fraction}")
        if not 0.0 < self.mia_alpha < 1.0:
            raise InvalidInputError(f"mia_alpha must be in (0, 1), got {self.mia_alpha}")
        if self.mia not in MIA_KINDS:
            raise InvalidInputError(f"unknown membership test mia={self.mia!r}; accepted: {', '.join(MIA_KINDS)}")
        check_shadow_count(self.lira_shadows)
        if self.wide_test and self.source.kind != "cifar10-zip":
            raise InvalidInputError(f"wide_test scores the rest of a CIFAR-10 zip's test split; the {self.name} "
                                    f"protocol reads {self.source.kind}, whose index holds every test image already")
        _check_methods(self.methods)
        from tmu_core.models import build_model

        build_model(self.arch, 2, 3, 32)  # raises for an unknown arch, listing the valid ones

    @property
    def experiment_count(self) -> int:
        """Forget sets per seed: one per forget class, or ``experiments`` for the ``random`` and ``owner`` shapes."""
        if self.forget_shape == "class" or self.experiments is None:
            return len(self.forget_classes)
        return self.experiments

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (the ``protocol`` entry of ``results.json``)."""
        return asdict(self)


def _check_ints(name: str, values: Sequence[Any], low: int) -> None:
    if not values:
        raise InvalidInputError(f"{name} must not be empty")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name}: every value must be an integer >= {low}, got {value!r}")
    if len(set(values)) != len(values):
        raise InvalidInputError(f"{name} lists a value more than once: {list(values)}")


def _check_shape(protocol: Protocol) -> None:
    if protocol.forget_shape not in FORGET_SHAPES:
        raise InvalidInputError(
            f"unknown forget shape {protocol.forget_shape!r}; accepted: {', '.join(FORGET_SHAPES)}")
    fraction = protocol.forget_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"forget_fraction must be a number in (0, 1), e.g. 0.01 for 1%, got {fraction!r}")
    _check_ints("owners", (protocol.owners,), 1)
    if protocol.experiments is not None:
        if protocol.forget_shape == "class":
            raise InvalidInputError("experiments applies to the random and owner forget shapes; the class shape "
                                    "runs one experiment per forget class (choose them with forget_classes)")
        _check_ints("experiments", (protocol.experiments,), 1)


def _check_methods(methods: Sequence[MethodSpec]) -> None:
    from tmu_core.unlearn import get_method

    if not methods:
        raise InvalidInputError("a protocol needs at least one method")
    labels = [spec.label for spec in methods]
    if len(set(labels)) != len(labels):
        raise InvalidInputError(f"method labels must be unique, got {labels}")
    reserved = {"original", "gold", "gold-floor"} & set(labels)
    if reserved:
        raise InvalidInputError(f"method labels {sorted(reserved)} are reserved for the reference rows")
    for spec in methods:
        get_method(spec.name, **dict(spec.options))  # raises on unknown names and bad options


def tmu_variants(
    noise_levels: Sequence[float] = (), feature_sets: Sequence[Sequence[str]] = (),
    base_options: Mapping[str, Any] | None = None,
) -> tuple[MethodSpec, ...]:
    """TMU rows for the paper's ablations: one per (noise level, feature subset) pair.

    Args:
        noise_levels: Gaussian noise levels of the easy samples (Table 4); empty keeps TMU's default.
        feature_sets: subsets of ``df``, ``af``, ``cf`` (Table 3); empty keeps TMU's default.
        base_options: other TMU options shared by every variant.

    Returns:
        Method specs labelled ``tmu``, ``tmu[noise=3]``, ``tmu[df+cf]`` or ``tmu[df+cf,noise=3]``.

    Raises:
        InvalidInputError: an unknown feature name, an empty subset, or a negative noise level.
    """
    for subset in feature_sets:
        bad = sorted(set(subset) - set(FEATURES))
        if not subset or bad:
            raise InvalidInputError(
                f"feature subset {list(subset)} is not accepted; use a non-empty subset of {', '.join(FEATURES)}"
            )
    for level in noise_levels:
        if level < 0:
            raise InvalidInputError(f"noise level must be >= 0, got {level}")
    specs = []
    for subset in feature_sets or [None]:
        for level in noise_levels or [None]:
            options, tags = dict(base_options or {}), []
            if subset is not None:
                options["features"] = tuple(f for f in FEATURES if f in subset)
                tags.append("+".join(options["features"]))
            if level is not None:
                options["noise_std"] = float(level)
                tags.append(f"noise={level:g}")
            specs.append(MethodSpec(f"tmu[{','.join(tags)}]" if tags else "tmu", "tmu", options))
    return tuple(specs)


def default_methods(names: Sequence[str] = ALL_METHODS) -> tuple[MethodSpec, ...]:
    """One row per method name, each with its default options."""
    return tuple(MethodSpec(name, name, {}) for name in names)


def _cifar_path(data: Path | None) -> str:
    path = Path(data) if data is not None else DEFAULT_CIFAR_ZIP
    if not path.is_file():
        raise InvalidInputError(
            f"CIFAR-10 zip not found at {path}; pass --data with the path of cifar10-jpeg.zip "
            "(ImageFolder layout train/<class>/*.jpg and test/<class>/*.jpg)"
        )
    return str(path.resolve())


def _digits_tiny(data: Path | None) -> Protocol:
    return Protocol(
        name="digits-tiny",
        source=DataSource("digits"),
        arch="small_cnn",
        train=TrainConfig(epochs=15, batch_size=64, lr=0.05, augment=False, milestones=(0.6, 0.85)),
        forget_classes=(3,),
        forget_size=20,
        methods=default_methods(("finetune", "neg_grad", "tmu")),
    )


def _cpu_small(data: Path | None) -> Protocol:
    return Protocol(
        name="cpu-small",
        source=DataSource("cifar10-zip", _cifar_path(data), train_per_class=500, test_per_class=100),
        arch="small_cnn",
        # No augmentation and a long high-lr phase, then two drops: the model fits its training set (measured
        # 95.6% after 22 epochs, 99.5% after 30), so D_f is memorised and forgetting it is measurable.
        # A step decay at 50% of 30 epochs (lr 0.01) stalls near 74%.
        train=TrainConfig(epochs=24, batch_size=64, lr=0.05, augment=False, milestones=(0.7, 0.9)),
        forget_classes=(3, 8, 1),
        forget_size=100,
        methods=default_methods(),
    )


def _paper(data: Path | None) -> Protocol:
    return Protocol(
        name="paper",
        source=DataSource("cifar10-zip", _cifar_path(data)),
        arch="resnet18",
        # The paper's ResNet-18 reaches about 85% test accuracy, the level of training without augmentation.
        train=TrainConfig.paper(augment=False),
        forget_classes=tuple(range(10)),
        forget_size=100,
        methods=default_methods(),
    )


def _cpu_photo(data: Path | None) -> Protocol:
    return Protocol(
        name="cpu-photo",
        # CIFAR-10 read as a model version with 48 px preprocessing reads its index (each 32 px image resized),
        # on a torchvision ResNet-18 as imported models are: the path of a user's own model, sized for 2 cores.
        source=DataSource("cifar10-zip", _cifar_path(data), train_per_class=100, test_per_class=60,
                          image_size=48),
        arch="torchvision:resnet18",
        train=TrainConfig(epochs=12, batch_size=64, lr=0.05, augment=False, milestones=(0.7, 0.9)),
        forget_classes=(3,),
        forget_size=50,
        methods=default_methods(("finetune", "neg_grad", "random_label", "scrub", "neg_grad_plus", "salun",
                                  "l1_sparse", "tmu")),
    )


_BUILTIN = {"digits-tiny": _digits_tiny, "cpu-small": _cpu_small, "paper": _paper, "cpu-photo": _cpu_photo}


def list_protocols() -> list[str]:
    """Names of the built-in protocols."""
    return sorted(_BUILTIN)


def builtin_protocol(name: str, data: Path | None = None) -> Protocol:
    """A built-in protocol by name.

    Args:
        name: one of :func:`list_protocols`.
        data: path of the CIFAR-10 zip for the CIFAR protocols (default: ``../shared/data/cifar10-jpeg.zip``
            beside the repository).

    Raises:
        InvalidInputError: unknown name, or the CIFAR-10 zip is missing.
    """
    if name not in _BUILTIN:
        raise InvalidInputError(f"unknown protocol {name!r}; valid: {', '.join(list_protocols())}")
    return _BUILTIN[name](data)


def customize(
    protocol: Protocol,
    *,
    methods: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    forget_size: int | None = None,
    seeds: Sequence[int] | None = None,
    noise_levels: Sequence[float] = (),
    feature_sets: Sequence[Sequence[str]] = (),
    variants: Sequence[str] = (),
    epochs: int | None = None,
    forget_shape: str | None = None,
    forget_fraction: float | None = None,
    owners: int | None = None,
    experiments: int | None = None,
    mia: str | None = None,
    lira_shadows: int | None = None,
    wide_test: bool | None = None,
    split_seed: int | None = None,
) -> Protocol:
    """A copy of ``protocol`` with some choices replaced (the CLI's overrides).

    Args:
        protocol: the base protocol.
        methods: method names to run instead of the protocol's (``tmu`` expands to its ablation variants).
        classes: forget classes.
        forget_size: forget samples per class (the paper also uses 500, 1000 and 4000).
        seeds: seeds.
        noise_levels: TMU noise levels; one TMU row each (Table 4).
        feature_sets: TMU feature subsets; one TMU row each (Table 3).
        variants: extra rows as ``method:key=value,...`` (e.g. ``tmu:cf_per_request=true``), each labelled
            with its own text.
        epochs: training epochs of the original and gold models.
        forget_shape: ``class``, ``random`` or ``owner`` (see :class:`Protocol`).
        forget_fraction: share of the training set per ``random`` experiment (SalUn uses 0.01 and 0.1).
        owners: owners per ``owner`` experiment.
        experiments: forget sets per seed for the ``random`` and ``owner`` shapes.
        mia: the membership test, ``population`` or ``lira``.
        lira_shadows: shadow models per seed of the ``lira`` test.
        wide_test: also score ACC on the rest of the zip's test split (see :class:`Protocol`).
        split_seed: seed of the twin/eval split of the test images.

    Raises:
        InvalidInputError: any value the protocol rejects, ablations asked for without ``tmu``, an option
            that the forget shape does not take (e.g. ``forget_size`` with ``random``), or ``lira_shadows``
            without the ``lira`` test.
    """
    shape = forget_shape if forget_shape is not None else protocol.forget_shape
    _check_shape_options(shape, {"--classes": classes, "--forget-size": forget_size,
                                 "--forget-fraction": forget_fraction, "--owners": owners,
                                 "--experiments": experiments})
    names = list(methods) if methods is not None else [spec.name for spec in protocol.methods]
    if (noise_levels or feature_sets) and "tmu" not in names:
        raise InvalidInputError("--noise and --features configure TMU; add tmu to --methods")
    specs = [] if methods is not None else [s for s in protocol.methods if s.name != "tmu"]
    for name in names if methods is not None else []:
        if name != "tmu":
            specs.append(MethodSpec(name, name, {}))
    if "tmu" in names:
        specs.extend(tmu_variants(noise_levels, feature_sets))
    for text in variants:
        name, options = parse_method_spec(text)
        get_method(name, **options)  # unknown methods and bad options fail here, before any training
        specs.append(MethodSpec(text.strip(), name, options))
    changes: dict[str, Any] = {"methods": tuple(specs)}
    if classes is not None:
        changes["forget_classes"] = tuple(classes)
    if forget_size is not None:
        changes["forget_size"] = forget_size
    if seeds is not None:
        changes["seeds"] = tuple(seeds)
    if epochs is not None:
        changes["train"] = replace(protocol.train, epochs=epochs)
    shape_options = {"forget_shape": forget_shape, "forget_fraction": forget_fraction, "owners": owners,
                     "experiments": experiments}
    changes.update({name: value for name, value in shape_options.items() if value is not None})
    changes.update(_mia_changes(protocol, mia, lira_shadows))
    if wide_test is not None:
        changes["wide_test"] = wide_test
    if split_seed is not None:
        changes["split_seed"] = split_seed
    return replace(protocol, **changes)


def _mia_changes(protocol: Protocol, mia: str | None, lira_shadows: int | None) -> dict[str, Any]:
    """The membership-test overrides; a shadow count is refused where no LiRA test would use it."""
    test = mia if mia is not None else protocol.mia
    if lira_shadows is not None and test != "lira":
        raise InvalidInputError(f"--lira-shadows applies to --mia lira, not to {test} (--mia)")
    changes: dict[str, Any] = {}
    if mia is not None:
        changes["mia"] = mia
    if lira_shadows is not None:
        changes["lira_shadows"] = lira_shadows
    return changes


_SHAPE_OPTIONS = {"--classes": ("class",), "--forget-size": ("class",), "--forget-fraction": ("random",),
                  "--owners": ("owner",), "--experiments": ("random", "owner")}


def _check_shape_options(shape: str, given: Mapping[str, Any]) -> None:
    """Refuse an option the forget shape would ignore, naming the shapes that take it."""
    for option, value in given.items():
        shapes = _SHAPE_OPTIONS[option]
        if value is not None and shape in FORGET_SHAPES and shape not in shapes:
            raise InvalidInputError(
                f"{option} applies to the {' and '.join(shapes)} forget shape{'s' if len(shapes) > 1 else ''}, "
                f"not to {shape} (--forget-shape)")
