"""The drift budget: how much an approximate lineage may cost before an exact retrain replaces it.

Every forget job records on its new version what the lineage has cost since its last exact version (the
original model, or the latest retrain): ``drift = {"exact_base", "base_acc_test", "acc_test", "cost",
"forgets", "samples", "exact_since", "cost_se", "base_right", "eval_key"}``, where ``cost`` is the exact
version's ACC on D_test minus this version's (percentage points, on the jobs' eval split) and ``cost_se`` its
standard error. Both versions are scored on the same images, so the error is the paired one: the spread of
"the exact version got this image right and this one did not" over the split (``base_right`` keeps which images
the exact version got right, ``eval_key`` which images those were). A 500-image split measures a cost to about
+-1.5 points, more than a 1-point budget, so a policy acts on the cost the split shows at ``confidence``: the
measured cost less that many standard errors (:meth:`DriftPolicy.evident`). A record without an error (an older
one, or a split that changed since the exact version) is taken at its measured cost.

A :class:`DriftPolicy` says when the lineage has cost too much: the evident cost passes ``budget``, or
``max_forgets`` forget jobs or ``max_age_s`` seconds have passed since the exact version. Then a low-priority
``retrain`` job is queued (:mod:`tmu_core.forget.retrain`); a forget job's commit queues it in its own
transaction, and the dispatcher checks the age limit on a schedule.

Past ``hold_at`` (evident cost, too) the lineage stops growing while a retrain is queued or running: the
dispatcher holds the model's forget jobs, and a forget job whose own new version would reach ``hold_at`` does not
serve it (:func:`retrain_to_wait_for`): it goes back to the queue and runs again on what the retrain swaps in. So
no version past the hold level is served while a retrain could replace it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sqlite3
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from tmu_core.errors import InvalidInputError
from tmu_core.state.versions import VersionRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftPolicy:
    """When a model's approximate versions are replaced by an exact retrain (None: that limit is off).

    Attributes:
        budget: ACC_Dtest points the lineage may lose against its last exact version.
        max_forgets: forget jobs since the last exact version.
        max_age_s: seconds since the last exact version was made, once it has forgotten something.
        hold_at: ACC_Dtest points of cost at which forget jobs stop being unlearned on top of the drifting lineage
            while its retrain runs: they wait in the queue, the retrain leaves their samples out, and they finish
            on the exact version (None: never hold; forget jobs go on beside the retrain).
        confidence: how sure the eval split must be that the cost passed ``budget`` or ``hold_at`` (one-sided;
            0.5 takes the measured cost as it is).
    """

    budget: float | None = None
    max_forgets: int | None = None
    max_age_s: float | None = None
    hold_at: float | None = None
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget < 0:
            raise InvalidInputError(f"the drift budget is ACC_Dtest points >= 0, got {self.budget}")
        if self.max_forgets is not None and self.max_forgets < 1:
            raise InvalidInputError(f"retrain after N forgets needs N >= 1, got {self.max_forgets}")
        if self.max_age_s is not None and self.max_age_s <= 0:
            raise InvalidInputError(f"retrain after a duration needs a duration > 0, got {self.max_age_s}s")
        if self.hold_at is not None and self.hold_at < 0:
            raise InvalidInputError(f"the hold level is ACC_Dtest points >= 0, got {self.hold_at}")
        if not 0.5 <= self.confidence < 1:
            raise InvalidInputError(f"the drift confidence is a probability in [0.5, 1), got {self.confidence}")

    def evident(self, drift: dict[str, Any]) -> float:
        """The cost the eval split shows at ``confidence``: the measured cost less that many standard errors."""
        se = drift.get("cost_se")
        if se is None:
            return drift["cost"]
        return drift["cost"] - NormalDist().inv_cdf(self.confidence) * se

    def holds(self, drift: dict[str, Any] | None) -> bool:
        """True when forget jobs on a lineage with this ``drift`` wait for its running retrain."""
        return (self.hold_at is not None and bool(drift) and bool(drift.get("forgets"))
                and self.evident(drift) >= self.hold_at)

    @property
    def enabled(self) -> bool:
        """True when any limit is set."""
        return any(v is not None for v in (self.budget, self.max_forgets, self.max_age_s))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def due(self, drift: dict[str, Any] | None, now: datetime | None = None) -> str | None:
        """Why the lineage described by ``drift`` must be retrained now, or None."""
        if not drift or not drift.get("forgets"):
            return None
        if self.budget is not None and self.evident(drift) > self.budget:
            return f"ACC_Dtest fell {self.describe(drift)} below exact v{drift['exact_base']} (budget {self.budget})"
        if self.max_forgets is not None and drift["forgets"] >= self.max_forgets:
            return f"{drift['forgets']} forget jobs since exact v{drift['exact_base']} (limit {self.max_forgets})"
        if self.max_age_s is not None:
            age = ((now or datetime.now(timezone.utc)) - datetime.fromisoformat(drift["exact_since"])).total_seconds()
            if age >= self.max_age_s:
                return f"exact v{drift['exact_base']} is {age / 86400:.1f} days old (limit {self.max_age_s / 86400:g})"
        return None

    def outlook(self, drift: dict[str, Any] | None) -> dict[str, Any]:
        """For a report: the policy, how far the lineage is from each limit, and whether a retrain is due."""
        if drift is None:
            return {"policy": self.to_json(), "due": None}
        left: dict[str, Any] = {}
        if self.budget is not None:
            left["cost_left"] = round(self.budget - self.evident(drift), 3)
        if self.max_forgets is not None:
            left["forgets_left"] = self.max_forgets - drift["forgets"]
        if self.max_age_s is not None:
            since = datetime.fromisoformat(drift["exact_since"]).timestamp()
            left["due_at"] = datetime.fromtimestamp(since + self.max_age_s, timezone.utc).isoformat(timespec="seconds")
        return {"policy": self.to_json(), "due": self.due(drift), **left}

    def describe(self, drift: dict[str, Any]) -> str:
        """The cost in words: ``2.40 points``, or ``2.40 +- 1.10 points (at least 0.59 at 95% confidence)``."""
        if drift.get("cost_se") is None:
            return f"{drift['cost']:.2f} points"
        if self.confidence == 0.5:
            return f"{drift['cost']:.2f} +- {drift['cost_se']:.2f} points"
        return (f"{drift['cost']:.2f} +- {drift['cost_se']:.2f} points (at least {self.evident(drift):.2f} at "
                f"{self.confidence:.0%} confidence)")


MAX_HOLDS = 2  # a forget job waits for at most this many retrains, then serves its version regardless


class HeldForRetrain(Exception):
    """A forget job's new version would reach the hold level while a retrain of its model is queued or running:
    the job waits for that retrain instead of serving the version.

    Attributes:
        retrain_id: the retrain job it waits for.
    """

    def __init__(self, retrain_id: str, reason: str) -> None:
        super().__init__(reason)
        self.retrain_id = retrain_id


def retrain_to_wait_for(store: Any, job: Any, drift: dict[str, Any], policy: DriftPolicy) -> HeldForRetrain | None:
    """Whether forget ``job``, whose new version would carry ``drift``, must wait for a retrain instead of serving it.

    It waits when the version reaches ``policy.hold_at`` and a retrain of the model is queued or running, queued now
    when the policy says the lineage is due. A lineage whose retrain failed is not retried automatically
    (:func:`schedule_if_due`), so its jobs serve their versions; a job that already waited ``MAX_HOLDS`` times does
    too, which bounds how long one request can wait.
    """
    if not policy.holds(drift) or sum(s["step"] == "held" for s in job.steps) >= MAX_HOLDS:
        return None
    schedule_if_due(store, job.model, drift, policy)
    active = store.jobs.active_retrain(job.model)
    if active is None:
        return None
    return HeldForRetrain(active.id, f"its version would be {policy.describe(drift)} of ACC_Dtest below exact "
                                     f"v{drift['exact_base']} (hold level {policy.hold_at}); it waits for retrain "
                                     f"{active.id} and runs again on the version that retrain serves")


def right_mask(right: Any) -> str:
    """Which images of the eval split a model got right (booleans, in the split's order), as compact hex."""
    return np.packbits(np.asarray(right, dtype=bool)).tobytes().hex()


def right_of(logits: Any, labels: Any) -> str:
    """:func:`right_mask` of a model's ``logits`` on images with ``labels``."""
    return right_mask((logits.argmax(1) == labels.to(logits.device)).cpu())


def eval_key(eval_ids: Sequence[str]) -> str:
    """A short fingerprint of the eval split's ids, in order: masks of two splits are never compared."""
    return hashlib.sha256("\n".join(eval_ids).encode()).hexdigest()[:16]


def paired_se(base_right: str, right: str, size: int) -> float | None:
    """The standard error (points) of the accuracy difference of two models scored on the same ``size`` images;
    None where either mask is missing or unreadable (a damaged record then gives the cost as measured, without an
    error, instead of failing the job that reads it)."""
    if size < 2 or not base_right or not right:
        return None
    try:
        unpack = [np.unpackbits(np.frombuffer(bytes.fromhex(m), dtype=np.uint8))[:size] for m in (base_right, right)]
    except (TypeError, ValueError):
        return None
    if any(len(u) != size for u in unpack):
        return None
    diff = unpack[0].astype(float) - unpack[1].astype(float)  # 1: only the exact version right; -1: only this one
    return float(100 * diff.std(ddof=1) / math.sqrt(size))


def with_error(record: dict[str, Any], base: dict[str, Any], right: str, key: str, size: int) -> dict[str, Any]:
    """``record`` with the paired error of its cost when ``base`` (the exact version's record) kept its mask of the
    same split; ``right`` is the mask of ``record``'s version."""
    if not key or base.get("eval_key") != key:
        return record
    se = paired_se(base.get("base_right", ""), right, size)
    if se is None:
        return record
    return {**record, "cost_se": round(se, 3), "base_right": base["base_right"], "eval_key": key}


def drift_after(source: VersionRecord, acc_test_before: float, acc_test_after: float, samples: int,
                rights: tuple[str, str] = ("", ""), key: str = "", size: int = 0) -> dict[str, Any]:
    """The ``drift`` record of a version a forget job derives from ``source``.

    Args:
        source: the version the job unlearned from.
        acc_test_before / acc_test_after: ACC on D_test of ``source`` and of the new version (the job's evaluate).
        samples: how many samples the job forgot.
        rights: :func:`right_mask` of ``source`` and of the new version on D_test (empty: the cost has no error).
        key / size: :func:`eval_key` of D_test and its number of images.
    """
    previous = source.metrics.get("drift")
    if source.kind == "exact" or not previous:
        previous = {"exact_base": source.version, "base_acc_test": acc_test_before, "forgets": 0, "samples": 0,
                    "exact_since": source.created_at or datetime.now(timezone.utc).isoformat(),
                    "base_right": rights[0], "eval_key": key}
    record = {"exact_base": previous["exact_base"], "base_acc_test": previous["base_acc_test"],
              "acc_test": acc_test_after, "cost": round(previous["base_acc_test"] - acc_test_after, 3),
              "forgets": previous["forgets"] + 1, "samples": previous["samples"] + samples,
              "exact_since": previous["exact_since"]}
    return with_error(record, previous, rights[1], key, size)


def exact_drift(version: int, acc_test: float, created_at: str, right: str = "", key: str = "") -> dict[str, Any]:
    """The ``drift`` record of an exact version: the start of a new lineage (``right``: its :func:`right_mask`
    of D_test, whose :func:`eval_key` is ``key``)."""
    record = {"exact_base": version, "base_acc_test": acc_test, "acc_test": acc_test, "cost": 0.0, "forgets": 0,
              "samples": 0, "exact_since": created_at}
    return {**record, "base_right": right, "eval_key": key} if right and key else record


def schedule_if_due(store: Any, model: str, drift: dict[str, Any] | None, policy: DriftPolicy,
                    conn: sqlite3.Connection | None = None) -> dict[str, Any] | None:
    """Queue a retrain of ``model`` when ``policy`` says its lineage is due (and none is queued or running).

    A lineage whose retrain already failed is not retried automatically (``tmu-admin retrain`` starts one).

    Returns:
        ``{"job_id", "reason", "queued"}`` when a retrain is due, else None.
    """
    reason = policy.due(drift) if policy.enabled else None
    if reason is None:
        return None
    failed = [j for j in store.jobs.retrains(model, conn=conn)
              if j.state == "failed" and j.options.get("exact_base") == drift["exact_base"]]
    if failed:
        return {"job_id": failed[0].id, "reason": reason, "queued": False,
                "note": f"the retrain of this lineage failed ({failed[0].reason}); start one with tmu-admin retrain"}
    job, created = store.jobs.submit_retrain(
        model, {"reason": reason, "exact_base": drift["exact_base"], "requested_by": "drift budget"}, conn=conn)
    if created:
        logger.info("model=%s: retrain %s queued: %s", model, job.id, reason)
    return {"job_id": job.id, "reason": reason, "queued": True}


_FLAGS = (("--drift-budget", "budget", float, "ACC_Dtest points a lineage may lose before an exact retrain is queued"),
          ("--retrain-after-forgets", "max_forgets", int, "queue an exact retrain after this many forget jobs"),
          ("--retrain-after-s", "max_age_s", float, "queue an exact retrain once the last exact version is this "
                                                    "many seconds old"),
          ("--drift-hold", "hold_at", float, "ACC_Dtest points of cost at which forget jobs wait for the retrain"),
          ("--drift-confidence", "confidence", float, "how sure the eval split must be that the cost passed a level"))


def add_policy_flags(parser: Any) -> None:
    """The policy's flags on an ``argparse`` parser (the extension and worker processes take them)."""
    for flag, _, kind, text in _FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=text)


def policy_from(args: Any) -> DriftPolicy:
    """The policy parsed by :func:`add_policy_flags` (a flag not given keeps the policy's default)."""
    given = {name: getattr(args, flag[2:].replace("-", "_")) for flag, name, _, _ in _FLAGS}
    return DriftPolicy(**{name: value for name, value in given.items() if value is not None})


def policy_flags(policy: DriftPolicy) -> list[str]:
    """The command-line flags that give ``policy`` to another process (none for a value left at its default)."""
    values, defaults = asdict(policy), asdict(DriftPolicy())
    return [part for flag, name, _, _ in _FLAGS if values[name] != defaults[name] for part in (flag, str(values[name]))]
