"""Checkpoints: one ``torch.save`` file ``{"meta": dict, "state_dict": ...}`` that loads with ``weights_only=True``."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tmu_core.errors import CheckpointError, InvalidInputError
from tmu_core.models import Classifier, build_model

logger = logging.getLogger(__name__)


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string, e.g. ``2025-01-31T12:00:00+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class CheckpointMeta:
    """How a checkpoint was made: enough to rebuild the model and to retrain it the same way.

    Attributes:
        arch: registry name of the architecture.
        num_classes: number of logits; equals ``len(class_names)``.
        class_names: label index -> class name.
        in_channels: image channels.
        image_size: side of the square input images.
        mean: per-channel mean of the training pixels in [0, 1].
        std: per-channel std of the training pixels in [0, 1].
        seed: the training seed.
        recipe: ``asdict(TrainConfig)`` of the run (or the unlearning recipe of a derived model);
            tuples are stored as lists, and ``TrainConfig.from_dict`` rebuilds the config.
        index_fingerprint: ``TrainingIndex.fingerprint`` of the training ids.
        train_size: number of training samples.
        parent: what this checkpoint derives from (e.g. the model version it was unlearned from), or None.
        created_at: ISO 8601 UTC time of creation.
        preprocess: how a raw image becomes the model's input (``tmu_core.preprocess.Preprocess.to_dict``);
            None for a checkpoint made before it was recorded: then the input is ``image_size`` square.
    """

    arch: str
    num_classes: int
    class_names: tuple[str, ...]
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    recipe: dict[str, Any]
    index_fingerprint: str
    train_size: int
    parent: str | None = None
    created_at: str = field(default_factory=utc_now)
    preprocess: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.num_classes != len(self.class_names):
            raise InvalidInputError(
                f"num_classes is {self.num_classes} but {len(self.class_names)} class names were given"
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise InvalidInputError(
                f"mean/std need {self.in_channels} values (one per channel), got {len(self.mean)}/{len(self.std)}"
            )
        if not isinstance(self.recipe, dict):
            raise InvalidInputError(f"recipe must be a dict, got {type(self.recipe).__name__}")
        # Lists, not tuples: the same value before saving and after loading (JSON or torch.load).
        object.__setattr__(self, "recipe", _plain(self.recipe))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of lists, strings and numbers (JSON-friendly and ``weights_only``-loadable)."""
        data = asdict(self)
        for key in ("class_names", "mean", "std"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CheckpointMeta":
        """Inverse of :meth:`to_dict`.

        Raises:
            CheckpointError: missing or unknown keys, or values that do not fit together.
        """
        if not isinstance(data, dict):
            raise CheckpointError(f"checkpoint meta must be a dict, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.name not in ("parent", "created_at", "preprocess")}
        missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise CheckpointError(f"checkpoint meta: missing keys {missing}, unknown keys {unknown}")
        try:
            return cls(**data)
        except (InvalidInputError, TypeError) as err:
            raise CheckpointError(f"checkpoint meta is inconsistent: {err}") from err


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so the value survives JSON and ``weights_only`` loading alike."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_checkpoint(path: str | Path, model: Classifier, meta: CheckpointMeta) -> Path:
    """Write ``{"meta", "state_dict"}`` atomically: a temp file in the same folder, fsync, ``os.replace``.

    Args:
        path: destination file; parent folders are created.
        model: the model (any device; tensors are saved from the CPU).
        meta: its metadata; must match the model's arch and class count.

    Returns:
        The path written.

    Raises:
        InvalidInputError: the model does not match ``meta``.
    """
    path = Path(path)
    _check_model_matches(model, meta)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"meta": meta.to_dict(), "state_dict": state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("saved checkpoint arch=%s classes=%d path=%s", meta.arch, meta.num_classes, path)
    return path


def _check_model_matches(model: Classifier, meta: CheckpointMeta) -> None:
    if not isinstance(model, Classifier):
        raise InvalidInputError(f"expected a tmu_core.models.Classifier, got {type(model).__name__}")
    got = (model.arch, model.head.out_features, model.in_channels)
    want = (meta.arch, meta.num_classes, meta.in_channels)
    if got != want:
        raise InvalidInputError(f"model (arch, classes, channels) {got} does not match the meta {want}")


def load_checkpoint(path: str | Path, device: torch.device | str) -> tuple[Classifier, CheckpointMeta]:
    """Rebuild the model of a checkpoint on ``device``, in eval mode.

    Raises:
        CheckpointError: the file is missing or unreadable, lacks ``meta``/``state_dict``, names an unknown
            architecture, or its weights do not fit the architecture the meta describes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable checkpoint: {type(err).__name__}: {err}") from err
    if not isinstance(payload, dict) or not {"meta", "state_dict"} <= set(payload):
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: expected a dict with keys ['meta', 'state_dict'], got {keys}")
    meta = CheckpointMeta.from_dict(payload["meta"])
    model = _model_for(meta, path)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match arch {meta.arch!r} of the meta: {err}") from err
    _check_norm_matches(model, meta, path)
    return model.to(device).eval(), meta


def _model_for(meta: CheckpointMeta, path: Path) -> Classifier:
    try:
        return build_model(meta.arch, meta.num_classes, meta.in_channels, meta.image_size, meta.mean, meta.std)
    except InvalidInputError as err:
        raise CheckpointError(f"{path}: cannot rebuild the model from its meta: {err}") from err


def _check_norm_matches(model: Classifier, meta: CheckpointMeta, path: Path) -> None:
    mean = model.mean.flatten().cpu()
    std = model.std.flatten().cpu()
    if not (torch.allclose(mean, torch.tensor(meta.mean)) and torch.allclose(std, torch.tensor(meta.std))):
        raise CheckpointError(
            f"{path}: normalisation in the weights (mean {mean.tolist()}, std {std.tolist()}) "
            f"differs from the meta (mean {list(meta.mean)}, std {list(meta.std)})"
        )
