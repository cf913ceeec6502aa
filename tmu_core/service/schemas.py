"""The management extension's contract as pydantic models: request bodies, answers and the one error body.

The OpenAPI description at ``GET /openapi.json`` is generated from these models, so every bound a body or a
parameter is checked against (ids, lengths, versions, limits) is written here once and both enforced at the edge
(422 with the field named) and published. Answers are documented, not filtered: the routes return the JSON built in
:mod:`tmu_core.forget.submit` and :mod:`tmu_core.state`, and the test suite checks that it matches these models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from tmu_core.forget.intake import DEFAULT_METHOD
from tmu_core.service.limits import MAX_ID_LENGTH, MAX_IDS_PER_REQUEST

# TorchServe model names, as archives and lock files accept them.
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
MODEL_NAME_LENGTH = 128
# Job (fj-...) and request (fr-...) ids: bounded, and free of anything a path or a log line could misread.
RECORD_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
MAX_VERSION = 2**31 - 1
MAX_LIST_LIMIT = 1000
MAX_OPTIONS = 64
# At least one character that Python's str.isspace() does not count as white space, the rule the forget intake
# applies; spelled out because JSON Schema's and Python's \s disagree on a few code points.
_NOT_BLANK = (r"[^\t\n\u000b\f\r\u001c-\u001f \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
JOB_STATE = Literal["queued", "running", "succeeded", "failed"]
REQUEST_STATE = Literal["pending", "succeeded", "failed"]


def _known_method(name: str) -> str:
    from tmu_core.unlearn import list_methods

    if name not in list_methods():
        raise ValueError(f"unknown unlearning method {name!r}; valid methods: {', '.join(list_methods())}")
    return name


def _whole_number(value: Any) -> Any:
    # JSON Schema counts 7.0 as an integer; strict mode would not, and would still refuse "7", true and 7.5.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _method_schema(schema: dict[str, Any]) -> None:
    from tmu_core.unlearn import list_methods

    schema["enum"] = list_methods()


Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=_NOT_BLANK,
                          description="a non-blank id of at most 256 characters")]
IdList = Annotated[list[Id], Field(max_length=MAX_IDS_PER_REQUEST)]


class ForgetBody(BaseModel):
    """Body of ``POST /forget`` and ``POST /forget/{model}``: at least one of ``sample_ids`` or ``owner_ids``."""

    model_config = ConfigDict(
        extra="forbid", strict=True,
        json_schema_extra={
            "minProperties": 1,
            "anyOf": [{"required": ["sample_ids"], "properties": {"sample_ids": {"minItems": 1}}},
                      {"required": ["owner_ids"], "properties": {"owner_ids": {"minItems": 1}}}],
            "examples": [{"sample_ids": ["train/a/0001"], "idempotency_key": "ticket-4711"},
                         {"owner_ids": ["owner-b-1"], "method": "tmu", "options": {"noise_std": 4.0}}],
        })
    sample_ids: IdList = Field(default_factory=list,
                               description="sample ids to forget (training samples, or an owner's test samples); "
                                           f"with owner_ids at most {MAX_IDS_PER_REQUEST} distinct ids in all (422)")
    owner_ids: IdList = Field(default_factory=list, description="data owners whose samples to forget")
    idempotency_key: str | None = Field(None, min_length=1, max_length=200,
                                        description="the same key returns the same request")
    method: Annotated[str, AfterValidator(_known_method)] = Field(
        DEFAULT_METHOD, description="unlearning method", json_schema_extra=_method_schema)
    options: dict[str, Any] = Field(
        default_factory=dict, max_length=MAX_OPTIONS,
        description="fields of the method's options; an unknown option or a value out of range is answered 400 "
                    "naming it and listing the valid ones", examples=[{"noise_std": 4.0}])

    @model_validator(mode="after")
    def _something_to_forget(self) -> "ForgetBody":
        if not self.sample_ids and not self.owner_ids:
            raise ValueError("nothing to forget: give at least one of sample_ids or owner_ids")
        distinct = len(set(self.sample_ids)) + len(set(self.owner_ids))
        if distinct > MAX_IDS_PER_REQUEST:
            raise ValueError(f"too many ids in one request ({distinct} distinct sample and owner ids); "
                             f"at most {MAX_IDS_PER_REQUEST}")
        return self


class RollbackBody(BaseModel):
    """Body of ``POST /models/{model}/rollback``."""

    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"to_version": 1}, {"to_version": 2,
                                                                                  "undo_forgets": True}]})
    to_version: Annotated[int, BeforeValidator(_whole_number)] = Field(..., ge=1, le=MAX_VERSION, description="the version to serve again")
    undo_forgets: bool = Field(False, description="allow serving a version trained on forgotten samples")


class ErrorBody(BaseModel):
    """Every error answer of the extension, whatever the status."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": "2 unknown sample id(s): zz/1, zz/2", "code": "unknownids", "status": 404,
         "unknown_ids": ["zz/1", "zz/2"], "kind": "sample"},
        {"error": "bad request: query.limit: Input should be less than or equal to 1000", "code": "invalid_input",
         "status": 422}]})
    error: str = Field(description="what failed, what arrived and what is accepted")
    code: str = Field(description="a short name of the error, e.g. invalid_input, unauthorized, jobnotfound")
    status: int = Field(ge=400, le=599, description="the HTTP status, repeated")
    unknown_ids: list[str] | None = Field(None, description="the ids the training index never held (404)")
    kind: Literal["sample", "owner"] | None = Field(None, description="what unknown_ids are (404)")
    error_id: str | None = Field(None, description="the id under which a server error (5xx) was logged")


class Health(BaseModel):
    """``GET /health``."""

    status: Literal["ok"]
    dispatcher: bool = Field(description="the job dispatcher runs")


class RequestJob(BaseModel):
    """One model's job of a forget request."""

    model: str
    job_id: str
    state: JOB_STATE | None
    step: str | None
    reason: str | None


class RequestView(BaseModel):
    """A forget request, its jobs' states and what is still to wipe (``GET /requests/{request_id}``)."""

    request_id: str
    scope: str = Field(description="'all', or the one model the request was about")
    state: REQUEST_STATE
    samples: int = Field(ge=0)
    pending_wipe: int = Field(ge=0, description="samples whose pixels are still to be wiped")
    recorded_only: list[str] = Field(description="models that only record the forget (no serving version trained "
                                                 "on the samples)")
    created_at: str
    jobs: list[RequestJob]


class Links(BaseModel):
    """Where to follow a one-model request."""

    job: str
    request: str


class ForgetAnswer(RequestView):
    """A forget request accepted (202), or found again by its idempotency key (200, ``existing: true``).

    A request about one model also carries that model's job as ``job_id``, ``job_state``, ``model``,
    ``merged_into`` and ``links``; ``samples`` is then that job's sample count.
    """

    job_id: str | None
    job_state: JOB_STATE | None = None
    model: str | None = None
    merged_into: str | None = None
    links: Links | None = None
    already_forgotten: list[str] | None = Field(None, description="requested ids the index had wiped already")
    existing: bool


class NothingToDo(BaseModel):
    """A forget request that changes nothing: no model is trained on the samples and none is left to wipe (200)."""

    request_id: None
    job_id: None
    state: Literal["nothing_to_do"]
    already_forgotten: list[str]
    message: str


class RequestList(BaseModel):
    """``GET /requests``: newest first."""

    requests: list[RequestView]


class JobStep(BaseModel):
    """A step a job's worker entered."""

    model_config = ConfigDict(extra="allow")
    step: str
    at: str


class Job(BaseModel):
    """One job as stored (``GET /jobs/{job_id}``): a forget job, or an exact retrain of the model."""

    id: str
    kind: Literal["forget", "retrain"]
    model: str
    state: JOB_STATE
    step: str | None
    progress: float = Field(ge=0, le=1)
    reason: str | None
    sample_ids: list[str]
    owner_ids: list[str]
    already_forgotten: list[str]
    options: dict[str, Any]
    idempotency_key: str | None
    merged_into: str | None
    merged_from: list[str]
    steps: list[JobStep]
    from_version: int | None
    to_version: int | None
    worker_pid: int | None
    result: dict[str, Any]
    followup: dict[str, Any]
    created_at: str
    started_at: str | None
    finished_at: str | None
    request_id: str | None
    attempts: int = Field(ge=0)
    not_before: str | None


class JobList(BaseModel):
    """``GET /jobs``: newest first."""

    jobs: list[Job]


class Version(BaseModel):
    """One version of a model."""

    model: str
    version: int = Field(ge=1)
    parent: int | None
    forget_request: str | None
    archive: str
    archive_sha256: str
    checkpoint: str
    checkpoint_sha256: str
    onnx: str | None
    onnx_sha256: str | None
    metrics: dict[str, Any]
    created_at: str
    state: str
    state_changed_at: str
    kind: Literal["exact", "approximate"] = Field(description="exact: trained on exactly its membership (an original "
                                                  "or a retrain); approximate: made by a forget method (also a retrain "
                                                  "caught up with samples forgotten while it trained)")
    trained_on: int | None = Field(description="training-set size, or null when the membership was not recorded")


class Versions(BaseModel):
    """``GET /models/{model}/versions``."""

    model: str
    serving: int | None
    versions: list[Version]
    forgotten: int = Field(ge=0)
    owed: int = Field(ge=0)


class RetrainBody(BaseModel):
    """Body of ``POST /models/{model}/retrain`` (optional)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{}, {"epochs": 10}]})
    epochs: Annotated[int, Field(ge=1, le=10_000), BeforeValidator(_whole_number)] | None = Field(
        None, description="epochs instead of the recorded recipe's")


class RetrainAnswer(BaseModel):
    """``POST /models/{model}/retrain``: the retrain job, new or the one already queued or running."""

    job_id: str
    model: str
    state: JOB_STATE
    existing: bool = Field(description="true when a retrain of the model was already queued or running")


class RollbackAnswer(BaseModel):
    """What a rollback did."""

    model: str
    from_version: int
    to_version: int
    undone_requests: list[str]
    seconds: float
    owed: int = Field(ge=0)
    owed_pixels_wiped: int = Field(ge=0)
    note: str | None = Field(None, description="what to do about owed samples, when there are any")
