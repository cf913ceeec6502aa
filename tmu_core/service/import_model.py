"""Bring your own classifier: import a torchvision model (weights file or stock TorchServe archive) as a version.

The import wraps the network as a ``torchvision:<name>`` :class:`tmu_core.models.Classifier`, writes a
checkpoint whose meta records the architecture, class names, normalisation and preprocessing (the weights'
torchvision transforms unless overridden), and the ids of the samples it was trained on; then it packages the
checkpoint as the model's next version and records it with that membership, so the version is served and
forgettable like one tmu-serve trained.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from tmu_core.config import Workspace
from tmu_core.errors import InvalidInputError
from tmu_core.models.stock_mar import load_weights, parse_class_names, read_stock_archive
from tmu_core.models.torchvision_import import build_torchvision, check_architecture, weights_transforms
from tmu_core.preprocess import Preprocess
from tmu_core.serving.archive import PackageResult, package_version
from tmu_core.state.versions import VersionRecord, VersionRegistry

logger = logging.getLogger(__name__)

# The recipe recorded for retrain/fine-tune baselines of an imported model (its own recipe is unknown).
IMPORT_RECIPE_EPOCHS = 30


@dataclass(frozen=True)
class ImportSpec:
    """What to import.

    Attributes:
        model: TorchServe model name.
        arch: torchvision architecture (``resnet50``); with ``mar`` optional (found from the archive).
        weights: a ``state_dict`` file of the bare torchvision network; exclusive with ``mar``.
        classes: class-name file (one a line, a JSON list or ``index_to_name.json``); required with ``weights``.
        mar: an archive made for TorchServe's stock ``image_classifier`` handler.
        image_size: model input side; None for the weights' crop size (224 for most).
        resize: shorter side before the centre crop; None for the weights' (256 for a 224 crop), or for
            ``image_size`` itself when ``image_size`` is given.
        trained_on: sample ids the model was trained on; None for the index's whole training split.
        version: version number; None for the registry's next.
        backend: ``onnx`` or ``torch``.
        batch_size: TorchServe batch size.
    """

    model: str
    arch: str | None = None
    weights: Path | None = None
    classes: Path | None = None
    mar: Path | None = None
    image_size: int | None = None
    resize: int | None = None
    trained_on: tuple[str, ...] | None = None
    version: int | None = None
    backend: str = "onnx"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if (self.weights is None) == (self.mar is None):
            raise InvalidInputError("give exactly one of weights (with arch and classes) or mar")
        if self.weights is not None and (self.arch is None or self.classes is None):
            raise InvalidInputError("importing a weights file needs arch and classes")
        if self.image_size is not None and self.image_size < 8:
            raise InvalidInputError(f"image_size must be >= 8, got {self.image_size}")


@dataclass(frozen=True)
class ImportResult:
    """An imported version: where it is, and what was recorded."""

    package: PackageResult
    record: VersionRecord
    arch: str
    head: str
    preprocess: dict
    trained_on: int | None


def import_model(workspace: Workspace, spec: ImportSpec) -> ImportResult:
    """Import a model as the next version of ``spec.model``: checkpoint, archive, registry row with membership.

    Raises:
        InvalidInputError: unreadable inputs, an unsupported architecture, weights that do not fit (missing,
            unexpected keys and differing shapes, sorted), an ambiguous head, or training ids the index lacks.
        ConflictError: the version is taken.
        CheckpointError: the ONNX copy fails its check.
    """
    from tmu_core.service.publish import record_package, training_ids
    from tmu_core.train import save_checkpoint

    arch, state, class_names, source = _read_source(spec)
    transforms = weights_transforms(arch)
    size = spec.image_size or transforms.crop
    resize = spec.resize or (transforms.resize if spec.image_size is None else None)
    preprocess = Preprocess(size=size, resize=resize, channels=3, interpolation=transforms.interpolation)
    model = build_torchvision(arch, len(class_names), 3, size, transforms.mean, transforms.std, state_dict=state)
    members = _members(workspace, spec.trained_on)
    meta = _meta(model, class_names, preprocess, members, source)
    staged = save_checkpoint(workspace.home / "staged" / spec.model / "import-checkpoint.pt", model, meta)
    members = training_ids(workspace, staged, members)
    registry = VersionRegistry(workspace.state_db)
    version = registry.reserve(spec.model, "package", spec.version)
    package = package_version(staged, workspace, spec.model, version, backend=spec.backend,
                              batch_size=spec.batch_size)
    record = record_package(workspace, package, members)
    staged.unlink(missing_ok=True)
    logger.info("imported model=%s version=%d arch=%s head=%s members=%s", spec.model, version, model.arch,
                model.head_path, None if members is None else len(members))
    return ImportResult(package=package, record=record, arch=model.arch, head=model.head_path,
                        preprocess=preprocess.to_dict(), trained_on=None if members is None else len(members))


def _read_source(spec: ImportSpec) -> tuple[str, dict, tuple[str, ...], dict]:
    if spec.mar is not None:
        stock = read_stock_archive(spec.mar, spec.arch)
        return stock.arch, stock.state_dict, stock.class_names, {"mar": spec.mar.name, "class": stock.model_class}
    arch = check_architecture(str(spec.arch))
    try:
        text = Path(spec.classes).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"cannot read the class names {spec.classes}: {err}") from err
    names = parse_class_names(text, str(spec.classes))
    return arch, load_weights(Path(spec.weights), str(spec.weights)), names, {"weights": Path(spec.weights).name}


def _members(workspace: Workspace, trained_on: tuple[str, ...] | None) -> list[str] | None:
    """The training ids to record in the meta's fingerprint: the given ones, else the index's training split."""
    if trained_on is not None:
        return sorted(set(trained_on))
    if not (workspace.index_dir / "index.sqlite").is_file():
        return None
    from tmu_core.index import TrainingIndex

    with TrainingIndex.open(workspace.index_dir) as index:
        return index.ids("train")


def _meta(model, class_names: tuple[str, ...], preprocess: Preprocess, members: list[str] | None, source: dict):
    from tmu_core.index.forget import ids_fingerprint
    from tmu_core.train import CheckpointMeta, TrainConfig

    recipe = {"train": asdict(TrainConfig(epochs=IMPORT_RECIPE_EPOCHS)),
              "imported": {"arch": model.arch, "head": model.head_path, **source}}
    return CheckpointMeta(arch=model.arch, num_classes=len(class_names), class_names=class_names, in_channels=3,
                          image_size=preprocess.size, mean=tuple(model.mean.flatten().tolist()),
                          std=tuple(model.std.flatten().tolist()), seed=0, recipe=recipe,
                          index_fingerprint=ids_fingerprint(members) if members else "",
                          train_size=len(members) if members else 0, preprocess=preprocess.to_dict())
