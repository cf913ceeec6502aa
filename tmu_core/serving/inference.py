"""Inference behind the TorchServe handler: settings, the torch and ONNX Runtime backends, top-k answers.

The handler stays a thin adapter: it builds a ``ClassifierService`` once from the worker's model folder and
hands every batch's payloads to ``ClassifierService.answer``. A bad item is answered with its own error and
status while the rest of the batch is predicted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tmu_core.device import cpu_layout
from tmu_core.errors import CheckpointError, InvalidInputError
from tmu_core.preprocess import Preprocess
from tmu_core.serving.decode import DEFAULT_MAX_PIXELS, DecodedRequest, ImageSpec, decode_request, request_payload

logger = logging.getLogger(__name__)

BACKENDS = ("onnx", "torch")
META_FILE = "meta.json"
ONNX_FILE = "model.onnx"
CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_MAX_BYTES = 6 << 20  # 6 MiB an image: a phone photo, just below TorchServe's 6.5 MB request cap
DEFAULT_MAX_IMAGES = 64


@dataclass(frozen=True)
class HandlerSettings:
    """The ``handler:`` section of an archive's ``model-config.yaml``.

    Attributes:
        backend: ``"onnx"`` (ONNX Runtime on ``model.onnx``) or ``"torch"`` (the checkpoint).
        top_k: classes returned per image; capped at the number of classes.
        max_bytes: largest accepted image (encoded bytes), in bytes.
        max_pixels: largest accepted width * height of an image, read from its header before decoding
            (decompression bombs are refused with a 400).
        max_images: most images in one request (a JSON list or ``{"images": [...]}``).
        threads: intra-op threads for the backend; 0 keeps the library default.
    """

    backend: str = "torch"
    top_k: int = 5
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES
    threads: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"handler.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        for name, low in (("top_k", 1), ("max_bytes", 1), ("max_pixels", 1), ("max_images", 1), ("threads", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInputError(f"handler.{name} must be an int >= {low}, got {value!r}")

    @classmethod
    def from_yaml(cls, model_yaml: Mapping[str, Any] | None) -> "HandlerSettings":
        """Read the ``handler`` section of a parsed ``model-config.yaml`` (missing keys keep defaults).

        Raises:
            InvalidInputError: unknown keys or invalid values.
        """
        section = dict((model_yaml or {}).get("handler") or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise InvalidInputError(f"unknown handler settings {unknown}; accepted: {sorted(known)}")
        return cls(**section)


@dataclass(frozen=True)
class ServingMeta:
    """What the serving side needs from a checkpoint's metadata (``meta.json`` in an archive)."""

    class_names: tuple[str, ...]
    in_channels: int
    image_size: int
    preprocess: Preprocess | None = None

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> "ServingMeta":
        """Build from a ``CheckpointMeta`` dict.

        Raises:
            CheckpointError: a field is missing or the class names do not match ``num_classes``.
        """
        missing = sorted({"class_names", "in_channels", "image_size", "num_classes"} - set(meta))
        if missing:
            raise CheckpointError(f"model metadata lacks {missing}")
        names = tuple(str(n) for n in meta["class_names"])
        if len(names) != int(meta["num_classes"]):
            raise CheckpointError(f"model metadata has {len(names)} class names for num_classes={meta['num_classes']}")
        try:
            preprocess = Preprocess.from_meta(dict(meta))
        except InvalidInputError as err:
            raise CheckpointError(f"model metadata has a bad preprocess: {err}") from err
        return cls(class_names=names, in_channels=int(meta["in_channels"]), image_size=int(meta["image_size"]),
                   preprocess=preprocess)


class Predictor(Protocol):
    """A backend: float images (N, C, H, W) in [0, 1] -> logits (N, K) as float32 numpy."""

    name: str

    def logits(self, images: torch.Tensor) -> np.ndarray: ...


class TorchPredictor:
    """Runs the checkpoint's model with torch on ``device``."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.model = model.to(device).eval()

    def logits(self, images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(cpu_layout(images.to(self.device, non_blocking=True)))
        return out.float().cpu().numpy()


class OnnxPredictor:
    """Runs ``model.onnx`` with ONNX Runtime; CUDA only when the build offers it and a GPU is assigned."""

    name = "onnx"

    def __init__(self, path: Path, gpu_id: int | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Idle pool threads would spin on cores that other workers (one per served version) need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[Any] = ["CPUExecutionProvider"]
        if gpu_id is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(gpu_id)}))
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise CheckpointError(f"cannot load ONNX model {path}: {err}") from err
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()

    def logits(self, images: torch.Tensor) -> np.ndarray:
        batch = np.ascontiguousarray(images.cpu().numpy(), dtype=np.float32)
        return np.asarray(self.session.run(None, {self.input_name: batch})[0], dtype=np.float32)


def load_predictor(model_dir: Path, settings: HandlerSettings, gpu_id: int | None = None) -> Predictor:
    """Open the backend named in ``settings`` from an unpacked archive folder.

    Args:
        model_dir: folder holding ``model.onnx`` and/or ``checkpoint.pt``.
        settings: handler settings (backend, threads).
        gpu_id: the worker's GPU, or None for CPU.

    Raises:
        CheckpointError: the backend's file is missing or unreadable.
    """
    if settings.backend == "onnx":
        path = model_dir / ONNX_FILE
        if not path.is_file():
            raise CheckpointError(f"backend 'onnx' needs {path}, which is missing")
        return OnnxPredictor(path, gpu_id=gpu_id, threads=settings.threads)
    from tmu_core.train import load_checkpoint

    if settings.threads:
        torch.set_num_threads(settings.threads)
    use_cuda = gpu_id is not None and torch.cuda.is_available()
    device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
    path = model_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"backend 'torch' needs {path}, which is missing")
    model, _ = load_checkpoint(path, device)
    return TorchPredictor(model, device)


def top_k(logits: np.ndarray, class_names: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Softmax over logits (N, K) and the k most probable classes per row, most probable first."""
    k = min(k, len(class_names))
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"class": class_names[i], "index": int(i), "probability": float(row[i])} for i in idx]
        for row, idx in zip(probs, order)
    ]


@dataclass(frozen=True)
class ItemResult:
    """The answer to one request of a batch: ``status`` 200 with ``body`` = predictions, else an error."""

    status: int
    body: dict[str, Any] | list[dict[str, Any]]


class ClassifierService:
    """Decodes a batch of payloads, predicts the good ones in one forward pass and shapes the answers."""

    def __init__(self, predictor: Predictor, meta: ServingMeta, settings: HandlerSettings, version: str) -> None:
        self.predictor = predictor
        self.meta = meta
        self.settings = settings
        self.version = version
        preprocess = meta.preprocess or Preprocess(size=meta.image_size, channels=meta.in_channels)
        self.spec = ImageSpec(preprocess, settings.max_bytes, settings.max_pixels, settings.max_images)

    @classmethod
    def from_model_dir(cls, model_dir: Path, model_yaml: Mapping[str, Any] | None, gpu_id: int | None,
                       version: str) -> "ClassifierService":
        """Build the service from an unpacked archive (``meta.json`` + the backend's model file)."""
        settings = HandlerSettings.from_yaml(model_yaml)
        meta_path = Path(model_dir) / META_FILE
        try:
            meta = ServingMeta.from_dict(json.loads(meta_path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot read {meta_path}: {err}") from err
        predictor = load_predictor(Path(model_dir), settings, gpu_id)
        logger.info("serving version=%s backend=%s preprocess=%s top_k=%d",
                    version, predictor.name, meta.preprocess, settings.top_k)
        return cls(predictor, meta, settings, version)

    def answer(self, items: Sequence[Any]) -> list[ItemResult]:
        """One result per TorchServe request item, in order; bad items get status 400 and an error message.

        A request carrying a list of images gets a list body, one entry per image (an image refused gets
        ``{"error": ...}`` in its slot); its status is 400 only when every image was refused.
        """
        requests: list[DecodedRequest | None] = [None] * len(items)
        results: list[ItemResult | None] = [None] * len(items)
        for idx, item in enumerate(items):
            where = f"image {idx + 1} of {len(items)}"
            try:
                requests[idx] = decode_request(request_payload(item, where), self.spec, where)
            except InvalidInputError as err:
                results[idx] = ItemResult(400, {"error": str(err)})
            except Exception as err:  # noqa: BLE001 - one odd payload must not take the batch down
                logger.exception("decoding failed item=%d of %d", idx + 1, len(items))
                msg = f"{where}: unreadable payload ({type(err).__name__}); expected an image or JSON"
                results[idx] = ItemResult(400, {"error": msg})
        answers = iter(self._predict([r for r in requests if r is not None]))
        for idx, request in enumerate(requests):
            if request is not None:
                results[idx] = _shape_result(request, [next(answers) for _ in request.images], self.version)
        return [r if r is not None else ItemResult(500, {"error": "no answer"}) for r in results]

    def _predict(self, requests: list[DecodedRequest]) -> list[dict[str, Any] | None]:
        """One forward pass over every good image of the batch; None in the slots of refused images."""
        flat = [image for request in requests for image in request.images]
        good = [image for image in flat if isinstance(image, torch.Tensor)]
        if not good:
            return [None] * len(flat)
        # (N, C, size, size) float in [0, 1]
        preds = iter(top_k(self.predictor.logits(torch.stack(good)), self.meta.class_names, self.settings.top_k))
        return [{"predictions": next(preds)} if isinstance(image, torch.Tensor) else None for image in flat]


def _shape_result(request: DecodedRequest, answers: list[dict[str, Any] | None], version: str) -> ItemResult:
    bodies = [{**answer, "model_version": version} if answer is not None else {"error": str(image)}
              for image, answer in zip(request.images, answers)]
    if not request.multi:
        return ItemResult(200 if answers[0] is not None else 400, bodies[0])
    if all(answer is None for answer in answers):
        return ItemResult(400, {"error": f"every image was refused: {bodies[0]['error']}", "results": bodies})
    return ItemResult(200, bodies)
