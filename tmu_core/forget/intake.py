"""Request intake: turning a forget request (sample ids and data owners) into a checked forget set before queueing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tmu_core.errors import InvalidInputError, UnknownIdsError

logger = logging.getLogger(__name__)

MAX_IDS = 100_000
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
            bad = [repr(v) for v in values if not isinstance(v, str) or not v.strip()]
            if bad:
                raise InvalidInputError(f"{name} must hold non-empty strings; got {', '.join(bad[:5])}")
            object.__setattr__(self, name, tuple(sorted(set(values))))
        if not self.sample_ids and not self.owner_ids:
            raise InvalidInputError("nothing to forget: give at least one of sample_ids or owner_ids")
        if len(self.sample_ids) + len(self.owner_ids) > MAX_IDS:
            raise InvalidInputError(f"too many ids in one request ({len(self.sample_ids) + len(self.owner_ids)}); "
                                    f"at most {MAX_IDS}")
        if self.idempotency_key is not None and not (0 < len(self.idempotency_key) <= 200):
            raise InvalidInputError("idempotency_key must be 1 to 200 characters long")


@dataclass(frozen=True)
class ForgetSet:
    """A request resolved against the training index.

    Attributes:
        ids: live training sample ids to forget (requested ids plus every live sample of the owners), sorted.
        already_forgotten: requested sample ids the index had already forgotten (reported, not redone).
        by_owner: how many live samples each requested owner contributed.
    """

    ids: tuple[str, ...]
    already_forgotten: tuple[str, ...]
    by_owner: dict[str, int]


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
        InvalidInputError: sample ids of the test split, which no model was trained on.
    """
    already = sorted(i for i in request.sample_ids if index.is_forgotten(i))
    gone = set(already)
    live = [i for i in request.sample_ids if i not in gone]
    records = index.lookup(live) if live else []
    test_ids = [r.sample_id for r in records if r.split != "train"]
    if test_ids:
        raise InvalidInputError(f"{len(test_ids)} sample id(s) belong to the test split, which no model was "
                                f"trained on; only training samples can be forgotten: {', '.join(test_ids[:20])}")
    ids, by_owner = set(live), {}
    if request.owner_ids:
        owned = index.ids_for_owners(list(request.owner_ids), split="train")  # lists every unknown owner
        by_owner = {owner: 0 for owner in request.owner_ids}
        for record in index.lookup(owned):
            by_owner[record.owner_id] = by_owner.get(record.owner_id, 0) + 1
        ids.update(owned)
    logger.info("forget request resolved: %d live samples, %d already forgotten, %d owners",
                len(ids), len(already), len(by_owner))
    return ForgetSet(ids=tuple(sorted(ids)), already_forgotten=tuple(already), by_owner=by_owner)


__all__ = ["ForgetRequest", "ForgetSet", "UnknownIdsError", "check_method", "resolve"]
