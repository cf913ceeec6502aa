"""Serving a model version on Ray Serve: the replica deployment and the archive store it loads from.

A replica answers ``POST /predictions/<model>`` with the same decode and inference code as the TorchServe handler
(:class:`tmu_core.serving.inference.ClassifierService`), so requests and answers are the same: raw image bytes,
``{"image": b64}``, lists; ``{"predictions": [...], "model_version": "<N>"}``; a bad item gets HTTP 400 with its
message. ``GET`` answers who the replica is (``{"model", "version", "replica", "node"}``), which the host uses
to check that every replica serves the version it deployed. Requests are grouped with ``@serve.batch``.

Files: replicas may sit on nodes that share no filesystem with the extension host, so they cannot read the model
store. The host (the workspace's single writer) puts each version's ``.mar`` into Ray's object store through
:class:`ArchiveStore`, a small named, detached actor that owns those objects: an object put by the host itself
would be owned by the host process and die with it (a forget job's worker is a short-lived process), while the
actor lives as long as the cluster. A replica fetches its version's archive from there, unpacks it into a
private temporary folder (mode 0700) and deletes that folder when Serve stops it.

Auth: Ray Serve has none, so each replica checks ``Authorization: Bearer <token>`` (401 otherwise, compared
with ``hmac.compare_digest``). The token is passed as a constructor argument of the deployment, not in
``user_config``, which ``serve status`` prints; ``user_config`` holds only the batching settings.

This module imports ``ray``; nothing in ``tmu_core`` imports it at import time.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from tmu_core.errors import CheckpointError
from tmu_core.serving.archive import CONFIG_FILE
from tmu_core.serving.inference import META_FILE, ClassifierService, ItemResult

logger = logging.getLogger(__name__)

STORE_ACTOR = "tmu-archives"
DEPLOYMENT = "ModelServer"
REPLICA_HEADER = "X-Tmu-Replica"


class ArchiveStore:
    """Archive bytes keyed by (model, version), held in the object store and owned by this actor."""

    def __init__(self) -> None:
        self._refs: dict[tuple[str, int], Any] = {}
        self._sizes: dict[tuple[str, int], int] = {}

    def put(self, model: str, version: int, data: bytes) -> int:
        """Keep ``data`` as the archive of ``model`` version ``version`` (replacing an earlier one); its size."""
        self._refs[(model, version)] = ray.put(data)
        self._sizes[(model, version)] = len(data)
        return len(data)

    def get(self, model: str, version: int) -> list[Any]:
        """``[ObjectRef]`` of the archive (a list, so the caller gets the reference, not the bytes), or ``[]``."""
        ref = self._refs.get((model, version))
        return [] if ref is None else [ref]

    def drop(self, model: str, version: int) -> bool:
        """Forget one archive; False when it was not held."""
        self._sizes.pop((model, version), None)
        return self._refs.pop((model, version), None) is not None

    def versions(self, model: str) -> dict[int, int]:
        """``{version: size in bytes}`` of the archives held for ``model``."""
        return {v: size for (m, v), size in self._sizes.items() if m == model}


def store_actor(namespace: str, create: bool = False) -> Any:
    """The cluster's archive store in ``namespace``; created (detached, no CPU) when ``create``.

    Raises:
        ValueError: it does not exist and ``create`` is False.
    """
    if not create:
        return ray.get_actor(STORE_ACTOR, namespace=namespace)
    return ray.remote(ArchiveStore).options(name=STORE_ACTOR, namespace=namespace, lifetime="detached",
                                            get_if_exists=True, num_cpus=0).remote()


def unpack_archive(data: bytes, model: str, version: int) -> tuple[Path, dict[str, Any]]:
    """Unpack a ``.mar`` into a new private temporary folder; returns it and the parsed ``model-config.yaml``.

    Raises:
        CheckpointError: the bytes are not a zip archive holding ``meta.json`` and ``model-config.yaml``.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"tmu-{model}-v{version}-"))
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as mar:
            names = set(mar.namelist())
            missing = sorted({META_FILE, CONFIG_FILE} - names)
            if missing:
                raise CheckpointError(f"archive of {model} version {version} lacks {missing}; "
                                      "package it with tmu-admin package")
            mar.extractall(folder)  # zipfile drops absolute paths and '..' from member names
        model_yaml = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
    except (zipfile.BadZipFile, yaml.YAMLError) as err:
        shutil.rmtree(folder, ignore_errors=True)
        raise CheckpointError(f"archive of {model} version {version} is unreadable: {err}") from err
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, model_yaml


def _fetch_archive(namespace: str, model: str, version: int, timeout_s: float) -> bytes:
    store = store_actor(namespace)
    refs = ray.get(store.get.remote(model, version), timeout=timeout_s)
    if not refs:
        raise CheckpointError(f"the archive store holds no archive of {model} version {version}; "
                              "register the version first")
    return ray.get(refs[0], timeout=timeout_s)


@serve.deployment(name=DEPLOYMENT)
class ModelServer:
    """One replica: a model version loaded from the archive store, answering authorised predictions."""

    def __init__(self, model: str, version: int, token: str, namespace: str, fetch_timeout_s: float = 120.0):
        self.model, self.version = model, int(version)
        self._expected = f"Bearer {token}".encode()
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()
        data = _fetch_archive(namespace, model, self.version, fetch_timeout_s)
        self.folder, model_yaml = unpack_archive(data, model, self.version)
        gpu_id = 0 if ray.get_gpu_ids() else None  # Ray narrows CUDA_VISIBLE_DEVICES to this replica's GPU
        try:
            self.service = ClassifierService.from_model_dir(self.folder, model_yaml, gpu_id, str(self.version))
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        logger.info("replica=%s model=%s version=%d loaded from %d bytes on node=%s", self.replica, model,
                    self.version, len(data), self.node)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply ``user_config``: ``max_batch_size`` and ``batch_wait_timeout_s``."""
        self._answer.set_max_batch_size(int(config.get("max_batch_size", 8)))
        self._answer.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.01)))

    def _authorised(self, request: Request) -> bool:
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, self._expected)

    def _reply(self, body: Any, status: int = 200) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers={REPLICA_HEADER: self.replica})

    def identity(self) -> dict[str, Any]:
        """Who answers: model, version, replica id and node id."""
        return {"model": self.model, "version": str(self.version), "replica": self.replica, "node": self.node}

    async def __call__(self, request: Request) -> JSONResponse:
        if not self._authorised(request):
            return self._reply({"code": 401, "type": "Unauthorized",
                                "message": "missing or wrong token: send 'Authorization: Bearer <token>' with the "
                                           "token from <serve_dir>/ray_token"}, 401)
        asked = request.url.path.removeprefix(f"/predictions/{self.model}").strip("/")
        if asked and asked != str(self.version):  # /predictions/<model>/<version>, as on TorchServe
            return self._reply({"code": 404, "type": "ModelNotFoundException",
                                "message": f"version {asked!r} of {self.model} is not served; Ray Serve serves "
                                           f"version {self.version} only"}, 404)
        if request.method == "GET":
            return self._reply(self.identity())
        if request.method != "POST":
            return self._reply({"code": 405, "message": f"{request.method} is not accepted; POST an image to "
                                "predict, GET to see the replica"}, 405)
        result: ItemResult = await self._answer({"body": await request.body()})
        return self._reply(result.body, result.status)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _answer(self, items: list[dict[str, Any]]) -> list[ItemResult]:
        # Inference runs in a thread, so health checks and GETs are answered while a batch runs.
        return await asyncio.get_running_loop().run_in_executor(None, self.service.answer, items)

    def __del__(self) -> None:
        folder = getattr(self, "folder", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("replica=%s removed the files of model=%s version=%d", self.replica, self.model,
                        self.version)


def build_app(model: str, version: int, token: str, spec: Any) -> Any:
    """The Serve application for one model version, from a :class:`tmu_core.serving.backend.BackendSpec`.

    New versions roll out with ``max_surge_percent=100``: Serve starts the new replicas, waits until they have
    loaded the version, and only then stops the old ones, which finish their requests first (requests a
    stopping replica refuses are retried elsewhere by Serve's router).
    """
    options: dict[str, Any] = {
        "num_replicas": spec.replicas,
        "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        "user_config": {"max_batch_size": spec.max_batch_size, "batch_wait_timeout_s": spec.batch_wait_timeout_s},
        "max_ongoing_requests": max(16, 2 * spec.max_batch_size),
        "max_surge_percent": 100,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": 30.0,
        "max_constructor_retry_count": 3,
    }
    if spec.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = spec.max_replicas_per_node
    return ModelServer.options(**options).bind(model, int(version), token, spec.namespace)


__all__ = ["ArchiveStore", "DEPLOYMENT", "ModelServer", "REPLICA_HEADER", "STORE_ACTOR", "build_app",
           "store_actor", "unpack_archive"]
