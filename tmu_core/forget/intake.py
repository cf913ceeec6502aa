"""Request intake: turning a forget request (sample ids and data owners) into a checked forget set before queueing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tmu_core.errors import ConflictError, InvalidInputError, ModelNotFoundError, UnknownIdsError
from tmu_core.service.limits import MAX_ID_LENGTH, MAX_IDS_PER_REQUEST

logger = logging.getLogger(__name__)

DEFAULT_METHOD = "tmu"


@dataclass(frozen=True)
class ForgetRequest:
    """What a caller asked to forget, checked for shape (not yet against the index).

    Attributes:
        sample_ids: training sample ids, deduplicated and sorted.
        owner_ids: data owner ids whose training samples are all forgotten, deduplicated and sorted.
        idempotency_key: the caller's key; the same key returns the same job.
        method: the unlearning method (``tmu`` unless asked otherwise).
        options: the method's options, checked by building the method.
    """

    sample_ids: tuple[str, ...] = ()
    owner_ids: tuple[str, ...] = ()
    idempotency_key: str | None = None
    method: str = DEFAULT_METHOD
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("sample_ids", "owner_ids"):
            values = getattr(self, name)
            if isinstance(values, str):
                raise InvalidInputError(f"{name} must be a list of strings, got the string {values!r}")
            bad = [repr(v)[:80] for v in values if not isinstance(v, str) or not v.strip() or len(v) > MAX_ID_LENGTH]
            if bad:
                raise InvalidInputError(f"{name} must hold non-empty strings of at most {MAX_ID_LENGTH} "
                                        f"characters; got {', '.join(bad[:5])}")
            object.__setattr__(self, name, tuple(sorted(set(values))))
        if not self.sample_ids and not self.owner_ids:
            raise InvalidInputError("nothing to forget: give at least one of sample_ids or owner_ids")
        if len(self.sample_ids) + len(self.owner_ids) > MAX_IDS_PER_REQUEST:
            raise InvalidInputError(f"too many ids in one request ({len(self.sample_ids) + len(self.owner_ids)}); "
                                    f"at most {MAX_IDS_PER_REQUEST}")
        if self.idempotency_key is not None and not (0 < len(self.idempotency_key) <= 200):
            raise InvalidInputError("idempotency_key must be 1 to 200 characters long")


@dataclass(frozen=True)
class ForgetSet:
    """A request resolved against the training index.

    Attributes:
        ids: live sample ids to forget (requested ids plus every live sample of the owners), sorted: training
            samples and the owners' test-split samples, which TMU's prepared state was built from.
        train_ids: the training samples among ``ids``.
        already_forgotten: requested sample ids the index had already wiped (reported, not redone).
        by_owner: how many live samples each requested owner contributed.
    """

    ids: tuple[str, ...]
    train_ids: tuple[str, ...]
    already_forgotten: tuple[str, ...]
    by_owner: dict[str, int]


@dataclass(frozen=True)
class FanOut:
    """Which models a forget set concerns.

    Attributes:
        jobs: model -> the training samples its serving version was trained on (a job unlearns them).
        recorded: model -> samples only its other, non-serving versions were trained on: no unlearning, but the
            model records them as forgotten, so those versions are never served again without ``undo_forgets``.
        wipe: samples whose pixels are wiped once no model needs them any more.
    """

    jobs: dict[str, tuple[str, ...]]
    recorded: dict[str, tuple[str, ...]]
    wipe: tuple[str, ...]

    @property
    def empty(self) -> bool:
        """True when the request changes nothing."""
        return not self.jobs and not self.recorded and not self.wipe


def check_method(request: ForgetRequest) -> None:
    """Build the requested unlearning method once, so that an unknown method or option fails before queueing.

    Raises:
        InvalidInputError: unknown method, unknown option or a value out of range (the message lists valid ones).
    """
    from tmu_core.unlearn import get_method

    try:
        get_method(request.method, **request.options)
    except TypeError as err:
        raise InvalidInputError(f"bad options for method {request.method!r}: {err}") from err


def resolve(index: Any, request: ForgetRequest) -> ForgetSet:
    """Check the request against the index and build the forget set.

    Args:
        index: an open :class:`tmu_core.index.TrainingIndex`.
        request: the checked request.

    Raises:
        UnknownIdsError: sample ids (or, failing that, owner ids) the index never held, all listed.
    """
    already = sorted(i for i in request.sample_ids if index.is_forgotten(i))
    gone = set(already)
    live = [i for i in request.sample_ids if i not in gone]
    records = {r.sample_id: r for r in (index.lookup(live) if live else [])}
    by_owner: dict[str, int] = {}
    if request.owner_ids:
        owned = index.ids_for_owners(list(request.owner_ids), split=None)  # lists every unknown owner
        by_owner = {owner: 0 for owner in request.owner_ids}
        for record in index.lookup(owned):
            by_owner[record.owner_id] = by_owner.get(record.owner_id, 0) + 1
            records[record.sample_id] = record
    train = sorted(sid for sid, r in records.items() if r.split == "train")
    logger.info("forget request resolved: %d live samples (%d training), %d already forgotten, %d owners",
                len(records), len(train), len(already), len(by_owner))
    return ForgetSet(ids=tuple(sorted(records)), train_ids=tuple(train), already_forgotten=tuple(already),
                     by_owner=by_owner)


def fan_out(state: Any, forget_set: ForgetSet, scope: str | None) -> FanOut:
    """Find every model (or only ``scope``) trained on the forget set, and what each must do.

    A version whose membership was never recorded counts as trained on every training sample.

    Args:
        state: the workspace's :class:`tmu_core.state.store.StateStore`.
        forget_set: the resolved request.
        scope: one model's name, or None for every model of the workspace.

    Raises:
        ModelNotFoundError: ``scope`` has no serving version.
    """
    models = [scope] if scope is not None else state.versions.models()
    jobs, recorded, train = {}, {}, set(forget_set.train_ids)
    for model in models:
        versions = state.versions.versions(model)
        serving = next((v for v in versions if v.state == "serving"), None)
        if serving is None:
            if scope is not None:
                raise ModelNotFoundError(f"model {model!r} is not served by tmu-serve (no serving version); "
                                         f"known models: {', '.join(state.versions.models()) or 'none'}")
            continue
        in_serving = _trained_on(state, model, serving.version, train)
        others: set[str] = set()
        for version in versions:
            if version.state not in ("serving", "purged"):
                others |= _trained_on(state, model, version.version, train)
        others -= in_serving | state.versions.forgotten(model)
        if in_serving:
            jobs[model] = tuple(sorted(in_serving))
        if others:
            recorded[model] = tuple(sorted(others))
    test_ids = set(forget_set.ids) - train
    touched = set().union(*jobs.values(), *recorded.values()) if (jobs or recorded) else set()
    wipe = (set(forget_set.ids) if scope is None else touched) | test_ids
    return FanOut(jobs=jobs, recorded=recorded, wipe=tuple(sorted(wipe)))


def _trained_on(state: Any, model: str, version: int, ids: set[str]) -> set[str]:
    found = state.membership.containing(model, version, ids)
    return set(ids) if found is None else found


def check_owed(state: Any, forget_set: ForgetSet, scope: str | None) -> None:
    """Refuse a request for samples a model owes (after ``undo_forgets``) whose pixels were already wiped.

    Raises:
        ConflictError: naming the model, the samples and the way out (a retrain on the retained data).
    """
    wiped = set(forget_set.already_forgotten)
    if not wiped:
        return
    for model in ([scope] if scope is not None else state.versions.models()):
        stuck = sorted(wiped & state.versions.owed(model))
        if stuck:
            raise ConflictError(
                f"model {model!r} is trained again on {len(stuck)} sample(s) that a rollback with undo_forgets "
                f"brought back, and their pixels are already wiped, so they cannot be unlearned: "
                f"{', '.join(stuck[:10])}; retrain {model!r} on its retained data (tmu-admin retrain {model}, "
                f"POST /models/{model}/retrain) to forget them")


__all__ = ["FanOut", "ForgetRequest", "ForgetSet", "UnknownIdsError", "check_method", "check_owed", "fan_out",
           "resolve"]
