"""HTTP client of the management extension (what ``tmu-admin`` uses), with errors mapped back to ``TmuError``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import requests

from tmu_core.config import Workspace, env_token
from tmu_core.errors import (AuthError, ConflictError, InvalidInputError, JobNotFoundError, ModelNotFoundError,
                             ServerError, TmuError, UnknownIdsError)

logger = logging.getLogger(__name__)


def _error(resp: requests.Response, what: str) -> TmuError:
    try:
        body = resp.json()
    except ValueError:
        body = {"error": resp.text[:300] or resp.reason, "code": ""}
    message = f"{what}: {body.get('error', body)}"
    code, status = body.get("code", ""), resp.status_code
    if status in (401, 403):
        return AuthError(message)
    if status == 404 and body.get("unknown_ids") is not None:
        return UnknownIdsError(body["unknown_ids"], body.get("kind", "sample"))
    if status == 404:
        return JobNotFoundError(message) if code == "jobnotfound" else ModelNotFoundError(message)
    if status == 409:
        return ConflictError(message)
    if 400 <= status < 500:
        return InvalidInputError(message)
    return ServerError(f"{message} (HTTP {status})")


class ExtensionClient:
    """Talks to the extension service.

    Args:
        url: e.g. ``http://127.0.0.1:8090``.
        token: the bearer key.
        timeout: seconds per request.
    """

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.session = requests.Session()

    @classmethod
    def from_workspace(cls, workspace: Workspace) -> "ExtensionClient":
        """The running service of ``workspace`` (url from its info file; token from ``TMU_TOKEN`` or the key file).

        Raises:
            ServerError: the service is not running for this workspace.
        """
        from tmu_core.service.server import read_info, read_key

        info = read_info(workspace)
        if info is None:
            raise ServerError(f"the extension service is not running for {workspace.home}; start it with "
                              "`tmu-admin extension start`")
        return cls(info.url, env_token() or read_key(workspace))

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            resp = self.session.request(method, self.url + path, timeout=self.timeout,
                                        headers={"Authorization": f"Bearer {self.token}"}, **kwargs)
        except requests.RequestException as err:
            raise ServerError(f"cannot reach the extension service at {self.url}: {err}") from err
        if resp.status_code >= 400:
            raise _error(resp, f"{method} {path}")
        return resp.json()

    def forget(self, model: str | None, sample_ids: list[str] | None = None, owner_ids: list[str] | None = None,
               idempotency_key: str | None = None, method: str = "tmu",
               options: dict[str, Any] | None = None) -> dict[str, Any]:
        """``POST /forget`` (every model trained on the samples; ``model`` None) or ``POST /forget/{model}``:
        the accepted request (``request_id``, its ``jobs``), or ``state: nothing_to_do``."""
        body = {"sample_ids": sample_ids or [], "owner_ids": owner_ids or [], "method": method,
                "options": options or {}}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        return self._call("POST", "/forget" if model is None else f"/forget/{model}", json=body)

    def request(self, request_id: str) -> dict[str, Any]:
        """``GET /requests/{id}``."""
        return self._call("GET", f"/requests/{request_id}")

    def wait_request(self, request_id: str, timeout: float = 3600.0, poll_s: float = 0.5,
                     on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll a forget request until it is no longer ``pending`` (or ``timeout`` passed).

        Raises:
            ServerError: still pending after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            view = self.request(request_id)
            if on_update is not None:
                on_update(view)
            if view["state"] != "pending":
                return view
            if time.monotonic() > deadline:
                raise ServerError(f"forget request {request_id} still pending after {timeout:.0f}s: {view['jobs']}")
            time.sleep(poll_s)

    def job(self, job_id: str) -> dict[str, Any]:
        """``GET /jobs/{id}``."""
        return self._call("GET", f"/jobs/{job_id}")

    def jobs(self, model: str | None = None, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """``GET /jobs``, newest first."""
        params = {k: v for k, v in (("model", model), ("state", state), ("limit", limit)) if v is not None}
        return self._call("GET", "/jobs", params=params)["jobs"]

    def versions(self, model: str) -> dict[str, Any]:
        """``GET /models/{model}/versions``."""
        return self._call("GET", f"/models/{model}/versions")

    def rollback(self, model: str, to_version: int, undo_forgets: bool = False) -> dict[str, Any]:
        """``POST /models/{model}/rollback``."""
        return self._call("POST", f"/models/{model}/rollback",
                          json={"to_version": to_version, "undo_forgets": undo_forgets})

    def retrain(self, model: str, epochs: int | None = None) -> dict[str, Any]:
        """``POST /models/{model}/retrain``."""
        return self._call("POST", f"/models/{model}/retrain", json={"epochs": epochs} if epochs else {})

    def health(self) -> dict[str, Any]:
        """``GET /health``."""
        return self._call("GET", "/health")

    def wait(self, job_id: str, timeout: float = 3600.0, poll_s: float = 0.5,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll a job until it succeeded or failed (or ``timeout`` passed); ``on_update`` sees every poll.

        Raises:
            ServerError: the job did not finish in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["state"] in ("succeeded", "failed"):
                return job
            if time.monotonic() > deadline:
                raise ServerError(f"job {job_id} still {job['state']} ({job.get('step')}) after {timeout:.0f}s")
            time.sleep(poll_s)
