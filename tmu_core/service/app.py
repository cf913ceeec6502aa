"""The management extension: a FastAPI app beside TorchServe for forget requests, jobs, versions and rollback.

Every route but ``/health`` and ``/openapi.json`` needs ``Authorization: Bearer <key>``, the key that the service
wrote to its key file when it started (mode 0600), like TorchServe's management key. Errors are JSON
``{"error": message, "code": short name, "status": HTTP status}`` (:class:`ErrorBody`); library errors map through
:func:`tmu_core.errors.http_status`, and anything unexpected is a 500 whose ``error_id`` is in the log. Nothing
invalid reaches the job queue: a request is checked for shape (the bounds of :mod:`tmu_core.service.schemas`, 422),
method options and against the training index before a job is written. ``GET /openapi.json`` lists, for every
operation, each status it answers and every bound it checks.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from tmu_core.config import Workspace
from tmu_core.errors import ModelNotFoundError, TmuError, UnknownIdsError, http_status
from tmu_core.forget.intake import ForgetRequest
from tmu_core.service.limits import BodyLimit
from tmu_core.service.schemas import (JOB_STATE, MAX_LIST_LIMIT, MODEL_NAME, MODEL_NAME_LENGTH, RECORD_ID,
                                      ErrorBody, ForgetAnswer, ForgetBody, Health, Job, JobList, NothingToDo,
                                      RequestList, RequestView, RetrainAnswer, RetrainBody, RollbackAnswer,
                                      RollbackBody, Versions)
from tmu_core.state.audit import AuditLog
from tmu_core.state.jobs import JobStore
from tmu_core.state.store import StateStore
from tmu_core.state.versions import VersionRegistry

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/openapi.json"})
_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="the key from the service's key file (`tmu-admin extension key`)")

ModelName = Annotated[str, Path(min_length=1, max_length=MODEL_NAME_LENGTH, pattern=MODEL_NAME,
                                description="a model name: letters, digits, '_' and '-'", examples=["m"])]
Limit = Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT, description="most items returned, newest first")]

# Why each status is answered; an operation lists the ones it can answer (plus 401, 403 and 500, which all can).
_WHY = {
    400: "malformed JSON, or options the unlearning method rejects (named, with the valid ones)",
    401: "no token, or a malformed Authorization header",
    403: "a token that is not the service's key",
    404: "not found",
    409: "the request clashes with the current state",
    413: "the body is over the service's size limit",
    422: "a parameter or body field out of its bounds; the message names the field",
    500: "an unexpected server error; the answer's error_id is in the service log",
    502: "TorchServe refused or did not answer",
}


def _errors(open_route: bool = False, **why: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for the given statuses (``s404="..."``), each with the one error body.

    Every operation can answer 500; every one but an ``open_route`` also 401 and 403.
    """
    statuses = {int(name[1:]): text for name, text in why.items()}
    statuses = {**statuses, 500: _WHY[500]} if open_route else {**statuses, 401: "", 403: "", 500: ""}
    return {status: {"model": ErrorBody, "description": text or _WHY[status]} for status, text in sorted(statuses.items())}


_BODY_ERRORS = {"s400": "", "s413": "", "s422": ""}


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


def error_body(status: int, code: str, message: str, headers: dict[str, str] | None = None,
               **extra: Any) -> JSONResponse:
    """The JSON error every route answers with (:class:`ErrorBody`)."""
    return JSONResponse({"error": message, "code": code, "status": status, **extra}, status_code=status,
                        headers=headers)


def _server_error(request: Request, status: int, code: str, message: str) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    logger.exception("error_id=%s %s %s answered %d: %s", error_id, request.method, request.url.path, status,
                     message)
    return error_body(status, code, f"{message} (error id {error_id}; the service log has the details)",
                      error_id=error_id)


def _tmu_error(request: Request, err: TmuError) -> JSONResponse:
    status = http_status(err)
    code = type(err).__name__.removesuffix("Error").lower() or "error"
    if status >= 500:
        return _server_error(request, status, code, str(err))
    extra = {"unknown_ids": err.ids, "kind": err.kind} if isinstance(err, UnknownIdsError) else {}
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


def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    if err.status_code == 404:
        message = f"no route {request.method} {request.url.path}; GET /openapi.json lists them"
    elif err.status_code == 405:
        allowed = (err.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
    else:
        message = str(err.detail)
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return error_body(err.status_code, code, message, headers=dict(err.headers or {}))


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
    app = FastAPI(title="tmu-serve management extension", version="1", docs_url=None, redoc_url=None,
                  description=__doc__, generate_unique_id_function=lambda route: route.name)  # operationId
    app.state.service = state
    app.add_exception_handler(TmuError, _tmu_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        denied = _check_token(request, state.key)
        if denied is not None:
            logger.warning("denied %s %s: %s", request.method, request.url.path, denied.status_code)
            denied.headers["WWW-Authenticate"] = "Bearer"
            return denied
        try:
            return await call_next(request)
        except Exception:  # noqa: BLE001 - the one place an unexpected error becomes an answer
            return _server_error(request, 500, "internal", "unexpected server error")

    app.add_middleware(BodyLimit)  # outermost: 413 before the token check or any body is read

    @app.get("/health", response_model=Health, responses=_errors(open_route=True), summary="Liveness")
    def health() -> Any:
        return JSONResponse({"status": "ok", "dispatcher": bool(state.dispatcher and state.dispatcher.alive())})

    router = APIRouter(dependencies=[Security(_BEARER)])
    _add_forget_routes(router, state)
    _add_job_routes(router, state)
    _add_model_routes(router, state)
    app.include_router(router)
    return app


def _add_forget_routes(router: APIRouter, state: ServiceState) -> None:
    answered = {200: {"model": ForgetAnswer | NothingToDo,
                      "description": "the request made earlier with this idempotency key (existing: true), or "
                                     "nothing to do (state: nothing_to_do)"}}
    unknown = ("unknown sample or owner ids (listed in unknown_ids, with kind)")
    clash = "the idempotency key was used with another scope, or owed samples can no longer be unlearned"

    @router.post("/forget", status_code=202, response_model=ForgetAnswer,
                 responses={**answered, **_errors(**_BODY_ERRORS, s404=unknown, s409=clash)},
                 summary="Forget samples or owners in every model trained on them")
    def forget_everywhere(body: ForgetBody) -> JSONResponse:
        return _submit_forget(state, None, body)

    @router.post("/forget/{model}", status_code=202, response_model=ForgetAnswer,
                 responses={**answered, **_errors(**_BODY_ERRORS, s404=unknown + ", or a model that serves "
                                                  "nothing", s409=clash)},
                 summary="Forget samples or owners in one model")
    def forget(model: ModelName, body: ForgetBody) -> JSONResponse:
        return _submit_forget(state, model, body)

    @router.get("/requests/{request_id}", response_model=RequestView,
                responses=_errors(s404="no request has this id", s422=""), summary="One forget request")
    def get_request(request_id: Annotated[str, Path(pattern=RECORD_ID, examples=["fr-0123456789ab"])]) -> Any:
        from tmu_core.forget.submit import request_view

        return JSONResponse(request_view(state.store, state.store.requests.get(request_id)))

    @router.get("/requests", response_model=RequestList, responses=_errors(s422=""),
                summary="Forget requests, newest first")
    def list_requests(limit: Limit = 50) -> Any:
        from tmu_core.forget.submit import request_view

        return JSONResponse({"requests": [request_view(state.store, r) for r in state.store.requests.list(limit)]})


def _add_job_routes(router: APIRouter, state: ServiceState) -> None:
    @router.get("/jobs/{job_id}", response_model=Job, responses=_errors(s404="no job has this id", s422=""),
                summary="One forget job")
    def get_job(job_id: Annotated[str, Path(pattern=RECORD_ID, examples=["fj-0123456789ab"])]) -> Any:
        return JSONResponse(state.jobs.get(job_id).to_json())

    @router.get("/jobs", response_model=JobList, responses=_errors(s422=""), summary="Forget jobs, newest first")
    def list_jobs(model: Annotated[str | None, Query(max_length=MODEL_NAME_LENGTH, pattern=MODEL_NAME)] = None,
                  job_state: Annotated[JOB_STATE | None, Query(alias="state")] = None, limit: Limit = 50) -> Any:
        jobs = state.jobs.list(model=model, state=job_state, limit=limit)
        return JSONResponse({"jobs": [j.to_json() for j in jobs]})


def _add_model_routes(router: APIRouter, state: ServiceState) -> None:
    @router.get("/models/{model}/versions", response_model=Versions,
                responses=_errors(s404="the model has no recorded versions", s422=""),
                summary="A model's versions, the one serving, and its forgotten and owed samples")
    def versions(model: ModelName) -> Any:
        records = state.registry.versions(model)
        if not records:
            raise ModelNotFoundError(f"model {model!r} has no recorded versions; known models: "
                                     f"{', '.join(state.registry.models()) or 'none'}")
        serving = next((r.version for r in records if r.state == "serving"), None)
        members = state.registry.membership
        versions = [{**r.to_json(), "trained_on": _size(members.members(model, r.version))} for r in records]
        return JSONResponse({"model": model, "serving": serving, "versions": versions,
                             "forgotten": len(members.forgotten(model)), "owed": len(members.owed(model))})

    @router.post("/models/{model}/rollback", response_model=RollbackAnswer,
                 responses=_errors(**_BODY_ERRORS, s404="unknown model or version",
                                   s409="it already serves that version, a forget job or another rollback runs, "
                                        "or forgets would be undone without undo_forgets",
                                   s502=""),
                 summary="Serve an earlier version again")
    def rollback(model: ModelName, body: RollbackBody) -> Any:
        from tmu_core.service.rollback import rollback as do_rollback

        result = do_rollback(state.workspace, model, body.to_version, undo_forgets=body.undo_forgets)
        return JSONResponse(result.to_json())

    @router.post("/models/{model}/retrain", status_code=202, response_model=RetrainAnswer,
                 responses={200: {"model": RetrainAnswer, "description": "a retrain was already queued or running"},
                            **_errors(**_BODY_ERRORS, s404="the model serves nothing")},
                 summary="Retrain the model exactly on its retained samples, in the background")
    def retrain(model: ModelName, body: RetrainBody | None = None) -> Any:
        state.registry.require_serving(model)
        options = {"reason": "requested", "requested_by": "tmu-admin retrain",
                   **({"method_options": {"epochs": body.epochs}} if body and body.epochs else {})}
        job, created = state.jobs.submit_retrain(model, options)
        if created and state.dispatcher is not None:
            state.dispatcher.wake()
        return JSONResponse({"job_id": job.id, "model": model, "state": job.state, "existing": not created},
                            status_code=202 if created else 200)


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
