"""Helpers shared by the command modules: error mapping and id-list parsing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from typing import Any

import click

from tmu_core.errors import TmuError


@contextlib.contextmanager
def tmu_errors() -> Iterator[None]:
    """Turn a ``TmuError`` into a ``click.ClickException`` (exit 1) with the error's own message."""
    try:
        yield
    except TmuError as err:
        raise click.ClickException(str(err)) from err


def parse_list(text: str | None) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; ``None`` or blank -> ``[]``."""
    if not text:
        return []
    return [part.strip() for part in text.split(",") if part.strip()]


def echo_json(value: Any) -> None:
    """Print a dataclass, list or dict as indented JSON on stdout."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    click.echo(json.dumps(value, indent=2, default=str))


DEFAULT_DRIFT_BUDGET = "1.0"
# A lineage this far below its exact version stops drifting: its forget requests wait for the running retrain.
# Measured in BENCHMARKS.md ("Back-to-back requests that do not wait for a preparation"): without it the retrain
# lands only after a back-to-back stream ends and the served model drifts 3.7 points below the gold.
DEFAULT_DRIFT_HOLD = "2.0"
# Both levels are read at this confidence on the eval split: a 500-image split measures a cost to about +-1.5
# points, and at the measured cost alone the stream in BENCHMARKS.md queued retrains on that noise.
DEFAULT_DRIFT_CONFIDENCE = 0.95


def drift_options(command: Any) -> Any:
    """The drift-budget options of the commands that start the extension (``serve start``, ``extension start``)."""
    options = [
        click.option("--drift-budget", default=DEFAULT_DRIFT_BUDGET, show_default=True,
                     help="ACC_Dtest points a model may lose against its last exact version before an exact "
                          "retrain on the retained data is queued in the background; 'off' never queues one."),
        click.option("--retrain-after-forgets", type=click.IntRange(min=1), default=None,
                     help="Also queue a retrain after this many forget jobs since the last exact version."),
        click.option("--retrain-after", "retrain_after", default=None,
                     help="Also queue a retrain once the last exact version is this old and has forgotten "
                          "something (e.g. 30d, 12h)."),
        click.option("--drift-hold", default=DEFAULT_DRIFT_HOLD, show_default=True,
                     help="ACC_Dtest points of cost at which forget requests stop being unlearned on top of the "
                          "drifting model while its retrain runs: they wait and the exact version covers them; "
                          "'off' unlearns them as usual meanwhile."),
        click.option("--drift-confidence", type=click.FloatRange(min=0.5, max=1, max_open=True),
                     default=DEFAULT_DRIFT_CONFIDENCE, show_default=True,
                     help="How sure the eval split must be that the cost passed the budget or the hold level "
                          "(one-sided, from the paired standard error over its images); 0.5 takes the measured "
                          "cost as it is."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def executor_options(command: Any) -> Any:
    """Where forget jobs' compute runs, for the commands that start the extension."""
    options = [
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: in the job's worker process; ray: in a warm per-model actor on a Ray cluster."),
        click.option("--ray-address", default=None,
                     help="The Ray cluster's address (HOST:PORT) for --executor ray and --backend ray."),
        click.option("--ray-num-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                     help="CPUs each model's actor asks for (and its torch threads)."),
        click.option("--ray-num-gpus", type=click.FloatRange(min=0), default=None,
                     help="GPUs each model's actor asks for (default: 1 when the cluster has a GPU, else 0)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def executor_settings(executor: str, ray_address: str | None, ray_num_cpus: float,
                      ray_num_gpus: float | None) -> Any:
    """The :class:`tmu_core.forget.executor.ExecutorSettings` of :func:`executor_options`."""
    from tmu_core.forget.executor import ExecutorSettings

    return ExecutorSettings(kind=executor, ray_address=ray_address, ray_num_cpus=ray_num_cpus,
                            ray_num_gpus=ray_num_gpus)


def _points(name: str, text: str) -> float | None:
    from tmu_core.errors import InvalidInputError

    if text.strip().lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise InvalidInputError(f"{name} takes ACC_Dtest points (e.g. 1.0) or 'off', got {text!r}") from None


def drift_policy(budget: str, after_forgets: int | None, after: str | None, hold: str = "off",
                 confidence: float = DEFAULT_DRIFT_CONFIDENCE) -> Any:
    """The :class:`~tmu_core.forget.drift.DriftPolicy` of :func:`drift_options`' values.

    Raises:
        InvalidInputError: a budget or hold level that is neither a number nor ``off``, or a bad duration.
    """
    from tmu_core.forget.drift import DriftPolicy
    from tmu_core.service.rollback import parse_duration

    age = parse_duration(after).total_seconds() if after else None
    return DriftPolicy(budget=_points("--drift-budget", budget), max_forgets=after_forgets, max_age_s=age,
                       hold_at=_points("--drift-hold", hold), confidence=confidence)
