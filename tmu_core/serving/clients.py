"""HTTP clients of TorchServe's management and inference APIs, with errors mapped to ``tmu_core.errors``.

A client made with a :class:`~tmu_core.serving.keys.KeyRing` reads its key from ``key_file.json`` for each
request and, when TorchServe refuses it (renewed or expired meanwhile), takes the file's newer key, or renews an
expired one, and sends the request once more.
A refused token (TorchServe 0.12: 400 ``InvalidKeyException``) -> ``AuthError``; 404 -> ``ModelNotFoundError``;
403/409 (e.g. removing the default version) -> ``ConflictError``; any other 400 from the inference API (the
handler refused the input) -> ``InvalidInputError``; anything else -> ``ServerError``. Messages carry TorchServe's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import requests

from tmu_core.errors import AuthError, ConflictError, InvalidInputError, ModelNotFoundError, ServerError, TmuError
from tmu_core.serving.keys import KeyRing

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    """One worker of a model version."""

    id: str
    status: str
    pid: int | None
    gpu: bool


@dataclass(frozen=True)
class ModelVersionInfo:
    """One model version as the management API describes it."""

    model: str
    version: str
    url: str
    batch_size: int
    max_batch_delay: int
    min_workers: int
    max_workers: int
    workers: tuple[WorkerInfo, ...]
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ready(self) -> bool:
        """At least one worker is READY."""
        return any(w.status == "READY" for w in self.workers)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelVersionInfo":
        """Parse one element of ``GET /models/<m>[/<v>]``."""
        workers = tuple(WorkerInfo(id=str(w.get("id", "")), status=str(w.get("status", "")), pid=w.get("pid"),
                                   gpu=bool(w.get("gpu", False))) for w in data.get("workers", []))
        return cls(model=data.get("modelName", ""), version=str(data.get("modelVersion", "")),
                   url=data.get("modelUrl", ""), batch_size=int(data.get("batchSize", 1)),
                   max_batch_delay=int(data.get("maxBatchDelay", 0)), min_workers=int(data.get("minWorkers", 0)),
                   max_workers=int(data.get("maxWorkers", 0)), workers=workers, raw=data)


@dataclass(frozen=True)
class ModelEntry:
    """One row of ``GET /models``."""

    name: str
    url: str


@dataclass(frozen=True)
class ClassScore:
    """One of the top-k classes of an answer."""

    name: str
    index: int
    probability: float


@dataclass(frozen=True)
class Prediction:
    """The answer to one image."""

    model_version: str
    predictions: tuple[ClassScore, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Prediction":
        """Parse the handler's ``{"predictions": [...], "model_version": "N"}``."""
        try:
            scores = tuple(ClassScore(p["class"], int(p["index"]), float(p["probability"]))
                           for p in data["predictions"])
            return cls(model_version=str(data["model_version"]), predictions=scores)
        except (KeyError, TypeError, ValueError) as err:
            raise ServerError(f"unexpected prediction answer {str(data)[:200]!r}: {err}") from err


def _message(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)
    return str(body)[:500]


class _Api:
    """Shared request plumbing: bearer token (fixed, or from a key ring), one retry after a refusal, errors."""

    api = "TorchServe"
    kind = "management"

    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0, keys: KeyRing | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.keys = keys
        self.session = requests.Session()

    def _current_token(self) -> str | None:
        if self.keys is None:
            return self.token
        try:
            self.token = self.keys.token(self.kind)
        except ServerError:
            if self.token is None:
                raise
            logger.warning("cannot read %s; using the last %s key read", self.keys.path, self.kind)
        return self.token

    def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None, data: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float | None = None) -> requests.Response:
        token = self._current_token()
        resp = self._send(method, path, token, params, data, headers, timeout)
        if self.keys is not None and token and _is_token_refusal(resp):
            try:
                token = self.token = self.keys.refresh(self.kind, token)
            except TmuError as err:
                raise AuthError(f"{method} {path}: TorchServe refused the {self.kind} key and it could not be "
                                f"renewed: {err}") from err
            resp = self._send(method, path, token, params, data, headers, timeout)
        if resp.status_code >= 400:
            raise self._error(resp, f"{method} {path}")
        return resp

    def _send(self, method: str, path: str, token: str | None, params: dict[str, Any] | None, data: bytes | None,
              headers: dict[str, str] | None, timeout: float | None) -> requests.Response:
        url = f"{self.base_url}{path}"
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        try:
            return self.session.request(method, url, params=params, data=data, headers=all_headers,
                                        timeout=timeout or self.timeout)
        except requests.RequestException as err:
            raise ServerError(f"cannot reach the {self.api} API at {url}: {err}") from err

    def _error(self, resp: requests.Response, what: str) -> TmuError:
        msg = f"{what}: TorchServe answered {resp.status_code}: {_message(resp)}"
        if _is_token_refusal(resp):
            return AuthError(msg)
        if resp.status_code == 404:
            return ModelNotFoundError(msg)
        if resp.status_code in (403, 409):  # e.g. "Cannot remove default version"
            return ConflictError(msg)
        return ServerError(msg)


def _is_token_refusal(resp: requests.Response) -> bool:
    # TorchServe 0.12 answers a bad or missing token with 400 and type InvalidKeyException.
    if resp.status_code == 401:
        return True
    try:
        body = resp.json()
    except ValueError:
        return False
    return resp.status_code == 400 and isinstance(body, dict) and body.get("type") == "InvalidKeyException"


class ManagementClient(_Api):
    """TorchServe's management API (register, set-default, unregister, describe, list)."""

    api = "TorchServe management"

    def register(self, url: str, model_name: str | None = None, synchronous: bool = True,
                 initial_workers: int = 1, timeout: float = 300.0) -> str:
        """Register an archive of the model store (``url`` = its file name) and start its workers.

        A version registered next to others does not become the default; call ``set_default``.

        Returns:
            TorchServe's status message.
        """
        params: dict[str, Any] = {"url": url, "synchronous": str(synchronous).lower(),
                                  "initial_workers": initial_workers}
        if model_name:
            params["model_name"] = model_name
        return _message(self._request("POST", "/models", params=params, timeout=timeout))

    def set_default(self, model: str, version: str | int) -> str:
        """Make ``version`` the one ``/predictions/<model>`` answers with."""
        return _message(self._request("PUT", f"/models/{model}/{version}/set-default"))

    def unregister(self, model: str, version: str | int | None = None, timeout: float = 120.0) -> str:
        """Unregister a version (the default version cannot be unregistered while others exist)."""
        path = f"/models/{model}" + (f"/{version}" if version is not None else "")
        return _message(self._request("DELETE", path, timeout=timeout))

    def scale(self, model: str, version: str | int | None = None, min_worker: int = 1,
              max_worker: int | None = None) -> str:
        """Set a version's worker count (synchronously)."""
        path = f"/models/{model}" + (f"/{version}" if version is not None else "")
        params = {"min_worker": min_worker, "max_worker": max_worker or min_worker, "synchronous": "true"}
        return _message(self._request("PUT", path, params=params, timeout=120.0))

    def describe(self, model: str, version: str | int | None = None) -> list[ModelVersionInfo]:
        """Every version of ``model`` (``version="all"``), or the given one, or the default when None."""
        path = f"/models/{model}" + (f"/{version}" if version is not None else "")
        body = self._request("GET", path).json()
        return [ModelVersionInfo.from_json(item) for item in (body if isinstance(body, list) else [body])]

    def list_models(self) -> list[ModelEntry]:
        """All registered model names (following pagination)."""
        entries: list[ModelEntry] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            body = self._request("GET", "/models", params=params).json()
            entries += [ModelEntry(m["modelName"], m.get("modelUrl", "")) for m in body.get("models", [])]
            token = body.get("nextPageToken")
            if not token:
                return entries
            params["next_page_token"] = token


class InferenceClient(_Api):
    """TorchServe's inference API."""

    api = "TorchServe inference"
    kind = "inference"

    def predict(self, model: str, image: bytes, version: str | int | None = None,
                content_type: str = "application/octet-stream") -> Prediction:
        """Classify one image (JPEG/PNG bytes, or a JSON body with ``content_type="application/json"``).

        Raises:
            InvalidInputError: the handler refused the input (HTTP 400; TorchServe's message included).
            ModelNotFoundError: no such model or version. AuthError: bad token. ServerError: anything else.
        """
        path = f"/predictions/{model}" + (f"/{version}" if version is not None else "")
        resp = self._request("POST", path, data=image, headers={"Content-Type": content_type})
        return Prediction.from_json(resp.json())

    def ping(self) -> str:
        """``GET /ping``: the frontend's health (not a model's readiness)."""
        return str(self._request("GET", "/ping").json().get("status", ""))

    def _error(self, resp: requests.Response, what: str) -> TmuError:
        if resp.status_code == 400 and not _is_token_refusal(resp):
            return InvalidInputError(f"{what}: {_message(resp)}")
        return super()._error(resp, what)
