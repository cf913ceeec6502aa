"""TorchServe handler for tmu-serve archives: a thin adapter over ``tmu_core.serving.inference``.

Requests (TorchServe groups them into batches of the archive's ``batchSize``):

* the body holds image bytes (JPEG, PNG, WebP, BMP, GIF, TIFF; any size and mode), preprocessed by the
  model version's ``Preprocess`` (see ``tmu_core.serving.decode``);
* ``{"image": "<base64 image>"}`` as JSON;
* several images: a JSON list of base64 images or ``{"images": [...]}``, answered with a list;
* nested JSON lists of pixels at the model's input size, as the body or as ``{"image": [...]}``:
  (C, H, W) or (H, W, C), ints 0..255 or floats in [0, 1].

Each answer is ``{"predictions": [{"class", "index", "probability"}, ...top-k], "model_version": "<N>"}``
(a list of those for a multi-image request).
A bad item gets HTTP 400 with a message naming the item, what arrived and what is accepted, and
``{"error": message}`` in its slot; the other items of the batch are still answered.

The ``handler:`` section of ``model-config.yaml`` picks the backend (``onnx`` or ``torch``), ``top_k``,
``max_bytes`` (per image), ``max_pixels`` (decompression bombs), ``max_images`` and ``threads``.
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

from ts.utils.util import PredictionException

from tmu_core.serving.inference import ClassifierService

logger = logging.getLogger(__name__)


class TmuHandler:
    """Loads the archive's model once per worker and answers batches of image requests."""

    def __init__(self) -> None:
        self.service: ClassifierService | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """Build the classifier service from the unpacked archive (called once per worker).

        Args:
            context: TorchServe's ``Context``: ``system_properties`` (``model_dir``, ``gpu_id``),
                ``manifest`` (model version) and ``model_yaml_config`` (handler settings).
        """
        props = context.system_properties
        manifest = context.manifest or {}
        version = str(manifest.get("model", {}).get("modelVersion", ""))
        self.service = ClassifierService.from_model_dir(
            Path(props["model_dir"]), context.model_yaml_config, props.get("gpu_id"), version)
        self.initialized = True

    def handle(self, data: list[Any] | None, context: Any) -> list[dict[str, Any]]:
        """Answer one batch: one entry per request, bad items with their own 400 status.

        Raises:
            PredictionException: the worker was not initialised (503).
        """
        if self.service is None:
            raise PredictionException("model is not loaded yet; retry shortly", 503)
        start = time.perf_counter()
        results = self.service.answer(data or [])
        for idx, result in enumerate(results):
            if result.status != 200:
                # The reason phrase is the standard one: TorchServe frames it by character count, so a
                # non-ASCII phrase (a message quoting the client's bytes) corrupts the frame and kills the
                # worker. The message itself travels in the JSON body.
                context.set_response_status(result.status, HTTPStatus(result.status).phrase, idx)
        if getattr(context, "metrics", None) is not None:
            context.metrics.add_time("TmuHandlerTime", (time.perf_counter() - start) * 1000.0, None, "ms")
        logger.debug("batch=%d errors=%d", len(results), sum(r.status != 200 for r in results))
        return [result.body for result in results]
