"""Reading what a TorchServe user already deployed: class-name files and stock ``image_classifier`` archives.

A stock archive (``torch-model-archiver --handler image_classifier --model-file model.py --serialized-file
weights.pth --extra-files index_to_name.json``) holds a model file defining the network class (for example
``class ImageClassifier(ResNet)``), its eager-mode weights and the class names. The model file is read, never
run: its base class names the torchvision family, and the architecture is the member of that family whose
parameter names and shapes are exactly those of the weights (or the one given as ``arch``).
"""

from __future__ import annotations

import ast
import io
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tmu_core.errors import InvalidInputError
from tmu_core.models.torchvision_import import (build_network, check_architecture, plain_state_dict,
                                                supported_architectures)

logger = logging.getLogger(__name__)

MANIFEST = "MAR-INF/MANIFEST.json"
CLASS_FILE = "index_to_name.json"
# torchvision base class named in a model file -> architecture-name prefixes of its family.
BASE_CLASSES: dict[str, tuple[str, ...]] = {
    "ResNet": ("resnet", "resnext", "wide_resnet"), "MobileNetV2": ("mobilenet_v2",),
    "MobileNetV3": ("mobilenet_v3",), "EfficientNet": ("efficientnet_",), "RegNet": ("regnet_",),
    "ConvNeXt": ("convnext_",), "DenseNet": ("densenet",), "VisionTransformer": ("vit_",),
    "SwinTransformer": ("swin_",),
}


@dataclass(frozen=True)
class StockArchive:
    """What a stock archive holds.

    Attributes:
        arch: the torchvision architecture name (``resnet18``).
        state_dict: the weights, in the bare network's key names.
        class_names: label index -> name, from ``index_to_name.json``.
        model_class: the class the model file defines (None without a model file).
        handler: the handler the archive was made for.
    """

    arch: str
    state_dict: dict[str, torch.Tensor]
    class_names: tuple[str, ...]
    model_class: str | None
    handler: str


def parse_class_names(text: str, source: str) -> tuple[str, ...]:
    """Class names from a file: a JSON list, a JSON ``index_to_name`` object (``{"0": "cat"}`` or
    ``{"0": ["n02123045", "tabby"]}``, the last entry being the name), or plain text, one name a line.

    Raises:
        InvalidInputError: fewer than two names, indices that are not 0..K-1, or repeated names.
    """
    stripped = text.strip()
    names: list[str]
    if stripped[:1] in "[{":
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"{source}: not valid JSON: {err}") from err
        names = [_name(v) for v in data] if isinstance(data, list) else _indexed(data, source)
    else:
        names = [line.strip() for line in stripped.splitlines() if line.strip()]
    if len(names) < 2:
        raise InvalidInputError(f"{source}: expected at least 2 class names, got {len(names)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInputError(f"{source}: class names repeat: {repeated[:10]}")
    return tuple(names)


def _name(value: Any) -> str:
    return str(value[-1] if isinstance(value, list) and value else value)


def _indexed(data: dict[str, Any], source: str) -> list[str]:
    try:
        by_index = {int(k): _name(v) for k, v in data.items()}
    except ValueError as err:
        raise InvalidInputError(f"{source}: keys must be class indices 0..K-1, got {sorted(data)[:5]}") from err
    if sorted(by_index) != list(range(len(by_index))):
        raise InvalidInputError(f"{source}: class indices must be 0..{len(by_index) - 1}, got {sorted(by_index)[:10]}")
    return [by_index[i] for i in range(len(by_index))]


def load_weights(data: bytes | Path, source: str) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from a ``.pth``/``.pt`` file or its bytes, loaded with ``weights_only=True``.

    Raises:
        InvalidInputError: unreadable, TorchScript, or not a dict of tensors.
    """
    try:
        payload = torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location="cpu",
                             weights_only=True)
    except Exception as err:  # torch raises many types for foreign or TorchScript files
        raise InvalidInputError(f"{source}: not an eager-mode state_dict file (TorchScript archives are not "
                                f"accepted; save model.state_dict() instead): {type(err).__name__}: {err}") from err
    return plain_state_dict(payload, source)


def model_file_class(source_text: str, source: str) -> tuple[str | None, str | None]:
    """(class defined in a model file, its torchvision base class if it names one), read with ``ast``."""
    try:
        tree = ast.parse(source_text)
    except SyntaxError as err:
        raise InvalidInputError(f"{source}: not valid Python: {err}") from err
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    for node in classes:
        for base in node.bases:
            name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
            if name in BASE_CLASSES:
                return node.name, name
    return (classes[0].name if classes else None), None


def match_architecture(state_dict: dict[str, torch.Tensor], num_classes: int, prefixes: tuple[str, ...] = (),
                       image_size: int = 224) -> str:
    """The architecture (among those starting with ``prefixes``; all supported when empty) whose parameter
    names and shapes equal the weights'. Candidates are built on the ``meta`` device: no memory, no init cost.

    Raises:
        InvalidInputError: none or several match.
    """
    names = [n for n in supported_architectures() if not prefixes or n.startswith(prefixes)]
    wanted = {k: tuple(v.shape) for k, v in state_dict.items()}
    matches = []
    for name in names:
        with torch.device("meta"):
            try:
                net = build_network(name, num_classes, image_size)
            except InvalidInputError:
                continue
        if {k: tuple(v.shape) for k, v in net.state_dict().items()} == wanted:
            matches.append(name)
    if len(matches) != 1:
        raise InvalidInputError(
            f"{'no' if not matches else 'several'} torchvision architecture(s) of {sorted(prefixes) or 'any family'} "
            f"match the weights ({len(wanted)} tensors){': ' + str(matches) if matches else ''}; pass --arch")
    return matches[0]


def read_stock_archive(path: Path, arch: str | None = None) -> StockArchive:
    """Read an archive made for TorchServe's stock ``image_classifier`` handler.

    Args:
        path: the ``.mar`` file.
        arch: the torchvision architecture; None to find it from the model file's class and the weights.

    Raises:
        InvalidInputError: not a model archive, no weights or ``index_to_name.json``, or no architecture fits.
    """
    try:
        with zipfile.ZipFile(path) as mar:
            files = {name: mar.read(name) for name in mar.namelist() if not name.endswith("/")}
    except (OSError, zipfile.BadZipFile) as err:
        raise InvalidInputError(f"{path}: not a model archive (zip): {err}") from err
    manifest = json.loads(files[MANIFEST]) if MANIFEST in files else {}
    model = manifest.get("model", {})
    weights_name = model.get("serializedFile") or next((n for n in files if n.endswith((".pth", ".pt"))), None)
    if weights_name not in files:
        raise InvalidInputError(f"{path}: no weights file (.pth) in the archive; files: {sorted(files)}")
    if CLASS_FILE not in files:
        raise InvalidInputError(f"{path}: no {CLASS_FILE} in the archive (the class names); files: {sorted(files)}")
    class_names = parse_class_names(files[CLASS_FILE].decode("utf-8"), f"{path}:{CLASS_FILE}")
    state = load_weights(files[weights_name], f"{path}:{weights_name}")
    model_file = model.get("modelFile")
    model_class, base = (model_file_class(files[model_file].decode("utf-8"), f"{path}:{model_file}")
                         if model_file in files else (None, None))
    if arch is None:
        arch = match_architecture(state, len(class_names), BASE_CLASSES.get(base or "", ()))
    logger.info("stock archive %s: class %s, arch %s, %d classes", path, model_class, arch, len(class_names))
    return StockArchive(arch=check_architecture(arch), state_dict=state, class_names=class_names,
                        model_class=model_class, handler=str(model.get("handler", "")))
