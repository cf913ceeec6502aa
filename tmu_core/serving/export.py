"""Export a classifier to ONNX and prove the copy computes what the torch model computes.

The graph takes float images (N, C, H, W) in [0, 1] named ``images`` and returns ``logits`` (N, K); the batch
axis is dynamic. The check runs ONNX Runtime on the CPU at two batch sizes and compares with torch; a copy
that differs by more than it accepts is refused and no file is left behind. The accepted difference is
``tolerance`` or ``rtol`` of the largest logit, whichever is larger: float32 rounding grows with the size of the
activations, so a real pretrained network with logits of 20 differs from its own float32 torch result by more
than 1e-4 while a wrong graph differs by whole units.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from tmu_core.device import generator
from tmu_core.errors import CheckpointError, InvalidInputError
from tmu_core.preprocess import Preprocess

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
DEFAULT_RTOL = 1e-3


@dataclass(frozen=True)
class OnnxCheck:
    """The outcome of an export.

    Attributes:
        path: the ONNX file.
        max_abs_diff: largest |onnxruntime - torch| over the logits of every checked batch.
        opset: the ONNX opset the graph was written with.
        batch_sizes: the batch sizes that were compared.
        tolerance: the largest difference that was accepted (``tolerance`` or ``rtol`` x the largest logit).
        sha256: hex digest of the file.
    """

    path: Path
    max_abs_diff: float
    opset: int
    batch_sizes: tuple[int, ...]
    tolerance: float
    sha256: str


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _meta_value(meta: Any, name: str) -> Any:
    value = meta.get(name) if isinstance(meta, Mapping) else getattr(meta, name, None)
    if value is None:
        raise InvalidInputError(f"model metadata lacks {name!r}; cannot choose the ONNX input shape")
    return value


def export_onnx(model: torch.nn.Module, meta: Any, path: Path, batch: int = 8, opset: int = DEFAULT_OPSET,
                tolerance: float = DEFAULT_TOLERANCE, seed: int = 0, rtol: float = DEFAULT_RTOL) -> OnnxCheck:
    """Write ``model`` as ONNX to ``path`` and check it against torch with onnxruntime (CPU).

    The model is copied to the CPU for export, so the caller's model (on any device) is left untouched.

    Args:
        model: a classifier taking float images (N, C, H, W) in [0, 1].
        meta: a ``CheckpointMeta`` (or its dict); the input shape comes from ``Preprocess.from_meta(meta)``.
        path: where the ``.onnx`` file goes; replaced only when the check passes.
        batch: the larger of the two checked batch sizes (the other is 1, or 3 when ``batch`` is 1).
        opset: ONNX opset version.
        tolerance: the largest accepted max abs difference of the logits, at least.
        seed: seed of the random sample images.
        rtol: the accepted difference relative to the largest |logit| of the checked batches, when larger.

    Returns:
        An ``OnnxCheck`` describing the file and the measured difference.

    Raises:
        InvalidInputError: bad arguments or metadata.
        CheckpointError: the export failed or onnxruntime disagrees with torch by more than ``tolerance``.
    """
    if batch < 1:
        raise InvalidInputError(f"batch must be >= 1, got {batch}")
    _meta_value(meta, "in_channels"), _meta_value(meta, "image_size")
    preprocess = Preprocess.from_meta(meta)
    shape = (preprocess.channels, preprocess.size, preprocess.size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    sizes = (batch, 1 if batch > 1 else 3)
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _export(cpu_model, shape, tmp, opset)
        max_diff, largest = _compare(cpu_model, tmp, shape, sizes, seed)
        accepted = max(tolerance, rtol * largest)
        if not max_diff <= accepted:
            raise CheckpointError(
                f"ONNX copy of {path.name} disagrees with torch: max abs diff {max_diff:.3g} > {accepted:.3g} "
                f"(the larger of {tolerance:g} and {rtol:g} x the largest logit {largest:.3g}); refusing to write it")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("exported onnx path=%s opset=%d max_abs_diff=%.3g", path, opset, max_diff)
    return OnnxCheck(path=path, max_abs_diff=max_diff, opset=opset, batch_sizes=sizes,
                     tolerance=accepted, sha256=sha256_file(path))


def _export(model: torch.nn.Module, shape: tuple[int, int, int], target: Path, opset: int) -> None:
    sample = torch.rand((2, *shape), generator=generator(0))
    try:
        torch.onnx.export(
            model, (sample,), str(target), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    except Exception as err:  # the exporter raises many types for unsupported graphs
        raise CheckpointError(f"ONNX export failed: {type(err).__name__}: {err}") from err


def _compare(model: torch.nn.Module, onnx_path: Path, shape: tuple[int, int, int],
             sizes: tuple[int, ...], seed: int) -> tuple[float, float]:
    """(largest |onnxruntime - torch|, largest |torch logit|) over the checked batches."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own exception types
        raise CheckpointError(f"onnxruntime cannot load the exported graph: {err}") from err
    gen = generator(seed)
    worst = largest = 0.0
    for n in sizes:
        images = torch.rand((n, *shape), generator=gen)  # (N, C, H, W) in [0, 1]
        with torch.inference_mode():
            expected = model(images).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
        if got.shape != expected.shape:
            raise CheckpointError(f"ONNX output shape {got.shape} != torch {expected.shape} at batch {n}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
        largest = max(largest, float(np.max(np.abs(expected))))
    return worst, largest
