"""The management extension: a FastAPI app beside TorchServe for forget requests, jobs, versions and rollback.

Every route but ``/health`` and ``/openapi.json`` needs ``Authorization: Bearer <key>``, the key that the service
wrote to its key file when it started (mode 0600), like TorchServe's management key. Errors are JSON
``{"error": message, "code": short name, "status": HTTP status}``; library errors map through
:func:`tmu_core.errors.http_status`. Nothing invalid reaches the job queue: a request is checked for shape, method
options and against the training index before a job is written.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tmu_core.config import Workspace
from tmu_core.errors import ModelNotFoundError, TmuError, UnknownIdsError, http_status
from tmu_core.forget.intake import DEFAULT_METHOD, ForgetRequest
from tmu_core.service.limits import MAX_ID_LENGTH, MAX_IDS_PER_REQUEST, BodyLimit
from tmu_core.state.audit import AuditLog
from tmu_core.state.jobs import JobStore
from tmu_core.state.store import StateStore
from tmu_core.state.versions import VersionRegistry

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/openapi.json"})


Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]


class ForgetBody(BaseModel):
    """Body of ``POST /forget`` and ``POST /forget/{model}``."""

    model_config = ConfigDict(extra="forbid")
    sample_ids: list[Id] = Field(default_factory=list, max_length=MAX_IDS_PER_REQUEST,
                                 description="sample ids to forget (training samples, or an owner's test samples)")
    owner_ids: list[Id] = Field(default_factory=list, max_length=MAX_IDS_PER_REQUEST,
                                description="data owners whose samples to forget")
    idempotency_key: str | None = Field(None, min_length=1, max_length=200,
                                        description="the same key returns the same request")
    method: str = Field(DEFAULT_METHOD, description="unlearning method (tmu)")
    options: dict[str, Any] = Field(default_factory=dict, description="method options, e.g. {\"noise\": 0.1}")


class RollbackBody(BaseModel):
    """Body of ``POST /models/{model}/rollback``."""

    model_config = ConfigDict(extra="forbid")
    to_version: int = Field(..., ge=1)
    undo_forgets: bool = False


@dataclass(frozen=True)
class ServiceState:
    """What the routes use: the workspace, its stores, the key and (optionally) the job dispatcher."""

    workspace: Workspace
    key: str
    registry: VersionRegistry
    jobs: JobStore
    audit: AuditLog
    store: StateStore
    dispatcher: Any = None

    @classmethod
    def open(cls, workspace: Workspace, key: str, dispatcher: Any = None) -> "ServiceState":
        """Open the state database of ``workspace`` (creating its tables)."""
        store = StateStore.open(workspace)
        return cls(workspace, key, store.versions, store.jobs, store.audit, store, dispatcher)


def error_body(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    """The JSON error every route answers with."""
    return JSONResponse({"error": message, "code": code, "status": status, **extra}, status_code=status)


def _tmu_error(_: Request, err: TmuError) -> JSONResponse:
    status = http_status(err)
    extra = {"unknown_ids": err.ids, "kind": err.kind} if isinstance(err, UnknownIdsError) else {}
    code = type(err).__name__.removesuffix("Error").lower() or "error"
    if status >= 500:
        logger.error("request failed: %s", err)
    return error_body(status, code, str(err), **extra)


def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    problems = []
    for item in err.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        if item.get("type") == "json_invalid":
            return error_body(400, "malformed_json", f"the body is not valid JSON: {item.get('msg')} "
                              f"(at position {item.get('ctx', {}).get('error', '?')})")
        problems.append(f"{where}: {item.get('msg')}")
    return error_body(422, "invalid_input", "bad request: " + "; ".join(problems))


def _check_token(request: Request, key: str) -> JSONResponse | None:
    if request.url.path in OPEN_PATHS:
        return None
    header = request.headers.get("authorization")
    if not header:
        return error_body(401, "unauthorized", "missing token: send 'Authorization: Bearer <key>' with the key "
                          "from the service's key file")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return error_body(401, "unauthorized", "malformed Authorization header; expected 'Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        return error_body(403, "forbidden", "wrong token: it does not match the service's key file")
    return None


def create_app(state: ServiceState) -> FastAPI:
    """Build the app around ``state``; the caller runs it (see :mod:`tmu_core.service.server`)."""
    app = FastAPI(title="tmu-serve management extension", version="1", docs_url=None, redoc_url=None)
    app.state.service = state
    app.add_exception_handler(TmuError, _tmu_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        denied = _check_token(request, state.key)
        if denied is not None:
            logger.warning("denied %s %s: %s", request.method, request.url.path, denied.status_code)
            denied.headers["WWW-Authenticate"] = "Bearer"
            return denied
        return await call_next(request)

    app.add_middleware(BodyLimit)  # outermost: 413 before the token check or any body is read
    _add_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: ServiceState) -> None:
    @app.get("/health")
    def health() -> dict[str, Any]:
        dispatcher = state.dispatcher
        return {"status": "ok", "dispatcher": bool(dispatcher and dispatcher.alive())}

    @app.post("/forget", status_code=202)
    def forget_everywhere(body: ForgetBody) -> JSONResponse:
        return _submit_forget(state, None, body)

    @app.post("/forget/{model}", status_code=202)
    def forget(model: str, body: ForgetBody) -> JSONResponse:
        return _submit_forget(state, model, body)

    @app.get("/requests/{request_id}")
    def get_request(request_id: str) -> dict[str, Any]:
        from tmu_core.forget.submit import request_view

        return request_view(state.store, state.store.requests.get(request_id))

    @app.get("/requests")
    def list_requests(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        from tmu_core.forget.submit import request_view

        return {"requests": [request_view(state.store, r) for r in state.store.requests.list(limit)]}

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return state.jobs.get(job_id).to_json()

    @app.get("/jobs")
    def list_jobs(model: str | None = None, job_state: str | None = Query(None, alias="state"),
                  limit: int = 50) -> dict[str, Any]:
        return {"jobs": [j.to_json() for j in state.jobs.list(model=model, state=job_state, limit=limit)]}

    @app.get("/models/{model}/versions")
    def versions(model: str) -> dict[str, Any]:
        records = state.registry.versions(model)
        if not records:
            raise ModelNotFoundError(f"model {model!r} has no recorded versions; known models: "
                                     f"{', '.join(state.registry.models()) or 'none'}")
        serving = next((r.version for r in records if r.state == "serving"), None)
        members = state.registry.membership
        versions = [{**r.to_json(), "trained_on": _size(members.members(model, r.version))} for r in records]
        return {"model": model, "serving": serving, "versions": versions,
                "forgotten": len(members.forgotten(model)), "owed": len(members.owed(model))}

    @app.post("/models/{model}/rollback")
    def rollback(model: str, body: RollbackBody) -> dict[str, Any]:
        from tmu_core.service.rollback import rollback as do_rollback

        result = do_rollback(state.workspace, model, body.to_version, undo_forgets=body.undo_forgets)
        return result.to_json()


def _size(members: set[str] | None) -> int | None:
    return None if members is None else len(members)


def _submit_forget(state: ServiceState, scope: str | None, body: ForgetBody) -> JSONResponse:
    """Check a forget request (shape, method, index, memberships), then record it and its jobs."""
    from tmu_core.forget.submit import submit_request

    request = ForgetRequest(sample_ids=tuple(body.sample_ids), owner_ids=tuple(body.owner_ids),
                            idempotency_key=body.idempotency_key, method=body.method, options=body.options)
    answer, created = submit_request(state.workspace, state.store, request, scope)
    if created and state.dispatcher is not None:
        state.dispatcher.wake()
    return JSONResponse(answer, status_code=202 if created else 200)
