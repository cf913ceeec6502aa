"""Package a checkpoint as a TorchServe model archive (``<model_store>/<name>-v<N>.mar``).

An archive holds the handler (``tmu_handler.py``), ``checkpoint.pt``, ``meta.json``, ``model.onnx`` (always
exported and checked against torch, whatever the backend) and ``model-config.yaml`` with TorchServe's worker
and batching settings plus the handler's own section. It is built in a private folder inside the model store
and linked into place only when complete; an existing archive is never overwritten.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from tmu_core.config import Workspace
from tmu_core.errors import CheckpointError, ConflictError, InvalidInputError, ModelNotFoundError
from tmu_core.serving.export import OnnxCheck, export_onnx, sha256_file
from tmu_core.serving.inference import (BACKENDS, CHECKPOINT_FILE, DEFAULT_MAX_BYTES, DEFAULT_MAX_IMAGES,
                                       DEFAULT_MAX_PIXELS, META_FILE, ONNX_FILE, HandlerSettings)

logger = logging.getLogger(__name__)

CONFIG_FILE = "model-config.yaml"
HANDLER_FILE = "tmu_handler.py"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_ARCHIVE_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]*)-v([0-9]+)\.mar$")


@dataclass(frozen=True)
class ServingOptions:
    """What goes into ``model-config.yaml``: TorchServe's worker/batching settings and the handler's section."""

    backend: str = "onnx"
    batch_size: int = 8
    max_batch_delay: int = 20
    top_k: int = 5
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES
    min_workers: int = 1
    max_workers: int = 1
    response_timeout: int = 120
    threads: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        for name, low in (("batch_size", 1), ("max_batch_delay", 0), ("top_k", 1), ("max_bytes", 1),
                          ("max_pixels", 1), ("max_images", 1), ("min_workers", 1), ("max_workers", 1), ("response_timeout", 1), ("threads", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")
        if self.max_workers < self.min_workers:
            raise InvalidInputError(f"max_workers ({self.max_workers}) < min_workers ({self.min_workers})")

    def model_config(self) -> dict[str, Any]:
        """The ``model-config.yaml`` mapping."""
        config: dict[str, Any] = {key: getattr(self, name) for name, key in _TORCHSERVE_KEYS.items()}
        config["handler"] = {f.name: getattr(self, f.name) for f in fields(HandlerSettings)}
        return config

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> "ServingOptions":
        """Inverse of :meth:`model_config` (missing keys keep their defaults).

        Raises:
            InvalidInputError: unknown handler keys or invalid values.
        """
        handler = HandlerSettings.from_yaml(config)
        values = {name: config[key] for name, key in _TORCHSERVE_KEYS.items() if config.get(key) is not None}
        return cls(**values, **{f.name: getattr(handler, f.name) for f in fields(HandlerSettings)})

    @classmethod
    def from_archive(cls, archive: Path) -> "ServingOptions":
        """The options an existing archive was packaged with, to package the next version alike.

        Raises:
            CheckpointError: the archive is missing or holds no readable ``model-config.yaml``.
        """
        try:
            with zipfile.ZipFile(archive) as mar:
                config = yaml.safe_load(io.BytesIO(mar.read(CONFIG_FILE))) or {}
        except (OSError, KeyError, zipfile.BadZipFile, yaml.YAMLError) as err:
            raise CheckpointError(f"cannot read {CONFIG_FILE} from {archive}: {err}") from err
        return cls.from_model_config(config)


# ServingOptions field -> model-config.yaml key (TorchServe's own settings; the handler's are its section).
_TORCHSERVE_KEYS = {"min_workers": "minWorkers", "max_workers": "maxWorkers", "batch_size": "batchSize",
                    "max_batch_delay": "maxBatchDelay", "response_timeout": "responseTimeout"}


@dataclass(frozen=True)
class PackageResult:
    """A packaged version.

    Attributes:
        model: the TorchServe model name.
        version: the version number (TorchServe version string ``str(version)``).
        archive: the ``.mar`` in the model store.
        checkpoint: the version's checkpoint in the workspace.
        onnx: the version's checked ONNX copy in the workspace.
        sha256s: hex sha256 of ``archive``, ``checkpoint`` and ``onnx``, by those keys.
        onnx_check: the export's measured parity with torch.
    """

    model: str
    version: int
    archive: Path
    checkpoint: Path
    onnx: Path
    sha256s: dict[str, str]
    onnx_check: OnnxCheck


def handler_source() -> Path:
    """The handler file packed into archives (``handler/tmu_handler.py``), found without importing it.

    Raises:
        CheckpointError: the handler package is not installed.
    """
    spec = importlib.util.find_spec("handler.tmu_handler")
    if spec is None or spec.origin is None:
        raise CheckpointError("cannot find handler/tmu_handler.py; is tmu-serve installed (pip install -e .)?")
    return Path(spec.origin)


def package_version(checkpoint_path: Path, workspace: Workspace, model_name: str, version: int,
                    backend: str = "onnx", batch_size: int = 8, max_batch_delay: int = 20, top_k: int = 5,
                    **options: Any) -> PackageResult:
    """Export, check and package one model version as ``<model_store>/<model_name>-v<version>.mar``.

    The checkpoint is copied to ``workspace.version_dir(model_name, version)/checkpoint.pt`` (unless it is
    already there) and the ONNX copy is written beside it.

    Args:
        checkpoint_path: a checkpoint written by ``tmu_core.train.save_checkpoint``.
        workspace: where the model store and the version folders are.
        model_name: TorchServe model name: letters, digits, ``_`` and ``-``.
        version: version number, >= 1.
        backend: ``"onnx"`` or ``"torch"``: what the handler runs.
        batch_size: TorchServe's batch size for the model.
        max_batch_delay: TorchServe's wait (ms) to fill a batch.
        top_k: classes returned per image.
        **options: further ``ServingOptions`` fields (``max_bytes``, ``min_workers``, ``max_workers``,
            ``response_timeout``, ``threads``: intra-op threads per worker, 0 for the library default).

    Returns:
        The archive, the version's files and their hashes.

    Raises:
        InvalidInputError: bad name, version or options.
        ConflictError: the archive already exists, or a different checkpoint is already stored for the version.
        CheckpointError: the checkpoint is unreadable, or the ONNX copy fails its check (no archive is written).
    """
    from tmu_core.train import load_checkpoint

    opts = ServingOptions(backend=backend, batch_size=batch_size, max_batch_delay=max_batch_delay, top_k=top_k,
                          **options)
    _check_name_version(model_name, version)
    archive = workspace.archive_path(model_name, version)
    if archive.exists():
        raise ConflictError(f"archive {archive} already exists; versions are never overwritten, "
                            "package under a new --version")
    model, meta = load_checkpoint(checkpoint_path, "cpu")
    vdir = workspace.version_dir(model_name, version)
    check = export_onnx(model, meta, vdir / ONNX_FILE)
    checkpoint = _place_checkpoint(Path(checkpoint_path), vdir / CHECKPOINT_FILE)
    workspace.model_store.mkdir(parents=True, exist_ok=True)
    _build_archive(model_name, version, checkpoint, check.path, meta.to_dict(), opts, archive)
    sha256s = {"archive": sha256_file(archive), "checkpoint": sha256_file(checkpoint), "onnx": check.sha256}
    logger.info("packaged model=%s version=%d backend=%s archive=%s", model_name, version, backend, archive)
    return PackageResult(model=model_name, version=version, archive=archive, checkpoint=checkpoint,
                         onnx=check.path, sha256s=sha256s, onnx_check=check)


def latest_archives(model_store: Path, models: list[str] | None = None) -> dict[str, tuple[int, Path]]:
    """The highest-numbered ``<name>-v<N>.mar`` of each model in the store.

    Args:
        model_store: the folder of archives.
        models: names to look up; None for every model found.

    Returns:
        ``{name: (version, archive)}``.

    Raises:
        ModelNotFoundError: a named model has no archive (the message lists the models that have one).
    """
    found: dict[str, tuple[int, Path]] = {}
    for path in sorted(Path(model_store).glob("*.mar")):
        match = _ARCHIVE_RE.match(path.name)
        if match:
            name, version = match.group(1), int(match.group(2))
            if name not in found or version > found[name][0]:
                found[name] = (version, path)
    if models is None:
        return found
    missing = [m for m in models if m not in found]
    if missing:
        raise ModelNotFoundError(f"no archive <name>-v<N>.mar in {model_store} for {missing}; "
                                 f"archived models: {sorted(found) or 'none'}")
    return {m: found[m] for m in models}


def _check_name_version(model_name: str, version: int) -> None:
    if not isinstance(model_name, str) or not _NAME_RE.match(model_name):
        raise InvalidInputError(
            f"model name {model_name!r} is not accepted; use letters, digits, '_' and '-', starting with a "
            "letter or digit")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidInputError(f"version must be an integer >= 1, got {version!r}")


def _place_checkpoint(source: Path, target: Path) -> Path:
    if source.resolve() == target.resolve():
        return target
    if target.exists():
        if sha256_file(target) != sha256_file(source):
            raise ConflictError(f"{target} already holds a different checkpoint; remove it or pick another version")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    shutil.copy2(source, tmp)
    os.replace(tmp, target)
    return target


def _build_archive(model_name: str, version: int, checkpoint: Path, onnx: Path, meta: dict[str, Any],
                   opts: ServingOptions, archive: Path) -> None:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_archiver_error import ModelArchiverError
    from model_archiver.model_packaging import package_model
    from model_archiver.model_packaging_utils import ModelExportUtils

    staging = Path(tempfile.mkdtemp(prefix=".package-", dir=archive.parent))
    try:
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(opts.model_config(), sort_keys=False))
        fields = dict(handler=str(handler_source()), version=str(version), serialized_file=str(checkpoint),
                      extra_files=f"{staging / META_FILE},{onnx}", config_file=str(staging / CONFIG_FILE),
                      export_path=str(staging))
        manifest = ModelExportUtils.generate_manifest_json(ModelArchiverConfig(model_name=model_name, **fields))
        # The archiver stages files under $TMPDIR/<model_name>: a unique name keeps parallel packaging apart.
        staged_name = f"{model_name}-v{version}-{uuid.uuid4().hex}"
        try:
            package_model(ModelArchiverConfig(model_name=staged_name, **fields), manifest=manifest)
        except (ModelArchiverError, OSError, ValueError) as err:
            raise CheckpointError(f"torch-model-archiver failed for {model_name} v{version}: {err}") from err
        _link_into_place(staging / f"{staged_name}.mar", archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_into_place(staged: Path, archive: Path) -> None:
    try:
        os.link(staged, archive)  # fails if the archive appeared meanwhile: never overwrite
    except FileExistsError as err:
        raise ConflictError(f"archive {archive} appeared while packaging; not overwriting it") from err
    except OSError:
        if archive.exists():
            raise ConflictError(f"archive {archive} already exists; not overwriting it") from None
        os.replace(staged, archive)
