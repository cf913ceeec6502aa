"""Sequential forget requests on scikit-learn's digits: each request on the previous one's model, real training."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace

import pytest
import torch
from click.testing import CliRunner

from tmu_core.cli import cli
from tmu_core.cli import evaluate_cmd  # noqa: F401  attaches the evaluate command
from tmu_core.errors import InvalidInputError
from tmu_core.evaluate import MethodSpec, builtin_protocol, run_sequential
from tmu_core.evaluate.sequential import union_steps
from tmu_core.evaluate.splits import ForgetDraw
from tmu_core.unlearn import UnlearnMethod, UnlearnOutcome, register_method

CPU = torch.device("cpu")
SPY_CALLS: list[tuple[str, object, tuple[str, ...], tuple[str, ...]]] = []


@dataclass(frozen=True)
class _SpyOptions:
    pass


@register_method("spy-sequential")
class _Spy(UnlearnMethod):
    """Records which model each call gets and returns a new model object per request."""

    options_type = _SpyOptions

    def prepare(self, model, meta, data, device, workdir=None):
        SPY_CALLS.append(("prepare", model, tuple(data.forget_ids), tuple(data.retain_ids)))

    def unlearn(self, model, meta, data, device, workdir=None):
        SPY_CALLS.append(("unlearn", model, tuple(data.forget_ids), tuple(data.retain_ids)))
        return UnlearnOutcome(copy.deepcopy(model), {}, 0.0)


def _protocol(*methods):
    base = builtin_protocol("digits-tiny")
    return replace(base, train=replace(base.train, epochs=4), forget_shape="owner", owners=2, methods=methods)


TMU = MethodSpec("tmu", "tmu", {"twin_epochs": 2, "clf_epochs": 20, "cf_epochs": 1, "max_steps": 5})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sequential-cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    SPY_CALLS.clear()
    out = tmp_path_factory.mktemp("sequential-out")
    protocol = _protocol(MethodSpec("spy", "spy-sequential", {}), TMU)
    result = run_sequential(protocol, 3, out, CPU, cache_dir=cache_dir, floor_every=2, progress=False)
    return result, out, list(SPY_CALLS)


def test_each_request_starts_from_the_previous_requests_model(run):
    result, _, calls = run
    kinds = [kind for kind, *_ in calls]
    assert kinds == ["prepare", "unlearn", "prepare", "unlearn", "prepare", "unlearn"]
    # The model a request gets is the object the previous request returned, after it was prepared for it.
    unlearns = [call for call in calls if call[0] == "unlearn"]
    prepares = [call for call in calls if call[0] == "prepare"]
    assert unlearns[0][1] is prepares[0][1]
    assert unlearns[1][1] is prepares[1][1] and unlearns[1][1] is not unlearns[0][1]
    assert unlearns[2][1] is prepares[2][1] and unlearns[2][1] is not unlearns[1][1]
    # Each request forgets its own draw; D_r shrinks by it; the next preparation sees that D_r.
    forgotten: set[str] = set()
    for (_, _, forget, retain), (_, _, _, prepared_retain) in zip(unlearns, prepares, strict=True):
        assert not forgotten & set(forget) and not set(forget) & set(retain)
        assert len(prepared_retain) == len(retain) + len(forget)  # prepared before this request
        forgotten |= set(forget)
        assert not forgotten & set(retain)


def test_every_step_is_scored_against_the_gold_of_the_union(run):
    result, _, calls = run
    steps = {}
    for row in result.rows:
        steps.setdefault(row.details["step"], []).append(row.method)
    # floor_every=2 over 3 steps: a floor gold at step 2 and at the last.
    assert steps == {1: ["original", "gold", "spy", "tmu"], 2: ["original", "gold", "gold-floor", "spy", "tmu"],
                     3: ["original", "gold", "gold-floor", "spy", "tmu"]}
    unions = [set(call[2]) for call in calls if call[0] == "unlearn"]
    golds = [row for row in result.rows if row.method == "gold"]
    total = set()
    for gold, step in zip(golds, unions, strict=True):
        total |= step
        assert gold.details["union_samples"] == len(total) and gold.delta == 0.0
        assert gold.details["step_samples"] == len(step)
    for row in result.rows:
        gold = next(g for g in golds if g.details["step"] == row.details["step"])
        assert row.delta == pytest.approx(abs(row.acc_df - gold.acc_df))
    assert result.splits.forget == len(total)


def test_tmu_updates_its_prepared_state_from_the_parents_between_requests(run):
    result, _, _ = run
    tmu = [row for row in result.rows if row.method == "tmu"]
    assert [row.details["prepared_before"] for row in tmu] == ["built", "incremental", "incremental"]
    assert all(row.prepare_seconds > 0 and row.seconds > 0 for row in tmu)


def test_files_hold_the_drift_table_and_the_rows(run):
    result, out, _ = run
    text = (out / "results.txt").read_text()
    assert text.startswith("seed 0: 3 sequential requests")
    assert "time over 3 requests (request + next preparation) against 3 retrains" in text
    assert "\n  tmu " in text and "\n  spy " in text
    assert (f"3 sequential requests of 2 owner(s) of a synthetic owner map each, each on the previous request's "
            f"model; {result.splits.forget} samples forgotten after the last") in text
    step1 = next(row for row in result.rows if row.method == "gold")
    assert f"\nstep-1: {step1.details['union_samples']} samples from " in text
    data = json.loads((out / "results.json").read_text())
    assert data["protocol"]["sequential"] == 3 and data["protocol"]["floor_every"] == 2
    assert len(data["rows"]) == len(result.rows)


def test_a_second_run_reads_every_model_from_the_cache(run, tmp_path, cache_dir):
    result = run_sequential(_protocol(MethodSpec("spy", "spy-sequential", {})), 3, tmp_path, CPU,
                            cache_dir=cache_dir, floor_every=2, progress=False)
    assert result.originals[0].cached
    first, _, _ = run
    before = [row.acc_df for row in first.rows if row.kind in ("gold", "floor")]
    assert [row.acc_df for row in result.rows if row.kind in ("gold", "floor")] == before


def test_union_steps_drop_what_earlier_requests_forgot():
    draws = [ForgetDraw("a", None, ("1", "2")), ForgetDraw("b", None, ("2", "3")), ForgetDraw("c", None, ("2",))]
    assert union_steps(draws[:2]) == [(("1", "2"), ("1", "2")), (("3",), ("1", "2", "3"))]
    with pytest.raises(InvalidInputError, match="request 3 .c. holds only samples forgotten before"):
        union_steps(draws)


def test_the_class_shape_and_bad_counts_are_refused(tmp_path):
    protocol = replace(_protocol(TMU), forget_shape="class", owners=1)
    with pytest.raises(InvalidInputError, match="drawn as random or owner forget sets, not class"):
        run_sequential(protocol, 3, tmp_path, CPU, progress=False)
    with pytest.raises(InvalidInputError, match=r"floor_every \(-1\) must be at least 1"):
        run_sequential(_protocol(TMU), 3, tmp_path, CPU, floor_every=-1, progress=False)


@pytest.mark.parametrize("args, message", [
    (["--sequential", "2", "--experiments", "2"], "--sequential K sets the number of forget sets"),
    (["--floor-every", "2"], "applies to --sequential runs only"),
    (["--sequential", "0"], "0 is not in the range x>=1"),
])
def test_cli_rejects_conflicting_sequential_options(args, message, tmp_path):
    outcome = CliRunner().invoke(cli, ["evaluate", "--protocol", "digits-tiny", "--forget-shape", "owner",
                                       "--out", str(tmp_path), "--no-progress", *args])
    assert outcome.exit_code != 0 and message in outcome.output, outcome.output
