"""TMU's incremental preparation: a new version's prepared state made from its parent version's.

The new version's state must hold its own model's features and no row of a forgotten id, keep the curriculum
model only when it never saw a forgotten id, keep no twin model, be found on disk by a later job, and give way
to a full build at the chain limit. A second process asking for a version that is being prepared waits and
reads what the first wrote.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_unlearn_support import make_problem, state_equal
from tmu_core.errors import InvalidInputError
from tmu_core.forget.artifacts import DataPlan, prepare
from tmu_core.unlearn import UnlearnData, get_method
from tmu_core.unlearn.common import correct_of, features_over
from tmu_core.unlearn.features import curriculum_feature
from tmu_core.unlearn.twin import train_cf_model

DEVICE = torch.device("cpu")
FAST = {"twin_epochs": 2, "cf_epochs": 1, "clf_epochs": 5, "max_steps": 3, "af_steps": 1}
TESTS = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def problem():
    return make_problem()


@functools.lru_cache(maxsize=1)
def parent_method():
    """v1's prepared state (a full build) in a method's memory."""
    prob = problem()
    method = get_method("tmu", **FAST)
    method.prepare(prob.model, prob.meta, prob.data(()), DEVICE)
    return method


def _successor(prob, forget):
    """v2: v1 unlearned on ``forget`` (one cheap epoch of negative gradient), and v2's data (D_r' only)."""
    model = get_method("neg_grad", epochs=1).unlearn(prob.model, prob.meta, prob.data(forget), DEVICE, None).model
    retain = tuple(i for i in prob.train_ids if i not in set(forget))
    return model.eval(), UnlearnData(prob.source, (), retain, prob.twin_ids)


def _forget(parent, inside_cf: bool, count: int = 4):
    cf = set(parent.cf_ids)
    return tuple(sorted([i for i in parent.train_ids if (i in cf) == inside_cf][:count]))


def _updated(inside_cf: bool):
    """v1's state, v2 (forgetting ids inside or outside the curriculum model's set), v2's data and v2's state."""
    prob, parent = problem(), parent_method().prepared
    forget = _forget(parent, inside_cf)
    model, data = _successor(prob, forget)
    method = get_method("tmu", **FAST)
    went = method.prepare_from(parent, model, prob.meta, data, DEVICE, None, "m:v1")
    assert went == "incremental" and method.builds == 0 and method.updates == 1
    return parent, forget, model, data, method.prepared


def test_incremental_state_holds_the_new_models_features_and_no_forgotten_row():
    parent, forget, model, data, state = _updated(inside_cf=True)
    assert state.train_ids == data.retain_ids and not set(forget) & set(state.train_ids)
    fresh = features_over(model, data.batches(data.retain_ids), len(data.retain_ids), DEVICE)
    assert torch.equal(state.train_features, fresh)
    assert not torch.equal(state.train_features, parent.train_features[parent.rows_of(data.retain_ids)[0]])
    assert state.twin_state == {}
    assert state.classifier is parent.classifier and torch.equal(state.twin_columns["df"], parent.twin_columns["df"])
    info = state.info
    assert info["kind"] == "incremental" and info["chain"] == 1 and info["parent"] == "m:v1"
    assert info["parent_key"] == parent.key and info["forgotten"] == len(forget) and "twin_model" in info["dropped"]
    assert "cf_model" in info["recomputed"] and "classifier" in info["kept"] and info["timings"]["total"] > 0
    json.dumps(info)


def test_the_held_out_reference_is_the_lineages_by_default_and_the_versions_own_on_request():
    """``reference="lineage"`` keeps the full build's held-out measurements through the chain (a drifted version
    must not become its own reference); ``"version"`` measures them again under the new model."""
    from tmu_core.unlearn.common import logits_of
    from tmu_core.unlearn.forget_tune import logit_margin

    parent, _, model, data, state = _updated(inside_cf=False)
    twin_images, twin_labels = data.tensors("twin")
    logits = logits_of(model, twin_images, DEVICE).cpu()
    own_easy, own_margins = logits.argmax(dim=1) == twin_labels, logit_margin(logits, twin_labels)
    assert not torch.equal(own_margins, parent.twin_margins), "v2 must differ from v1 on the twin samples"
    for name in ("twin_easy", "class_rates", "twin_margins", "twin_logits", "reference_counts"):
        assert torch.equal(getattr(state, name), getattr(parent, name)), name
    assert torch.equal(state.twin_columns["prior"], parent.twin_columns["prior"])
    assert state.info["reference"] == "lineage" and {"twin_easy", "twin_margins"} <= set(state.info["kept"])

    own = get_method("tmu", reference="version", **FAST)
    version_parent = get_method("tmu", reference="version", **FAST)
    version_parent.prepare(problem().model, problem().meta, problem().data(()), DEVICE)
    assert own.prepare_from(version_parent.prepared, model, problem().meta, data, DEVICE) == "incremental"
    mine = own.prepared
    assert torch.equal(mine.twin_easy, own_easy) and torch.equal(mine.twin_margins, own_margins)
    assert torch.equal(mine.twin_logits, logits)
    assert mine.reference_counts.tolist() == torch.bincount(data.labels_of(data.retain_ids), minlength=4).tolist()
    assert int(parent.reference_counts.sum()) == len(parent.train_ids) > int(mine.reference_counts.sum())
    assert torch.equal(mine.twin_easy, correct_of(model, twin_images, twin_labels, DEVICE).cpu())
    assert mine.info["reference"] == "version" and "twin_margins" in mine.info["recomputed"]
    # A full build measures under its own model whatever the reference: both states of v1 agree.
    for name in ("twin_easy", "class_rates", "twin_margins", "twin_logits", "reference_counts"):
        assert torch.equal(getattr(version_parent.prepared, name), getattr(parent, name)), name


def test_the_held_out_anchor_pulls_towards_the_lineage_or_towards_the_version_the_request_starts_from():
    """On v2 (a state updated from v1's), the anchor's reference logits are v1's with the default
    ``held_out_reference="lineage"`` and v2's own with ``"version"``; each request ends nearer its reference."""
    from tmu_core.unlearn.common import logits_of
    from tmu_core.unlearn.forget_tune import _kl

    parent, _, model, data, _ = _updated(inside_cf=False)
    request = UnlearnData(problem().source, tuple(data.retain_ids[:6]), tuple(data.retain_ids[6:]), data.twin_ids)
    twin_images, _ = data.tensors("twin")
    references = {"lineage": parent.twin_logits, "version": logits_of(model, twin_images, DEVICE).cpu()}
    pull = {**FAST, "held_out_weight": 100.0, "guard_size": len(data.twin_ids) // 2, "max_steps": 12,
            "min_steps": 12, "consolidate_steps": 0}
    ends = {}
    for name in references:
        method = get_method("tmu", **pull, held_out_reference=name)
        method.prepare_from(parent, model, problem().meta, data, DEVICE, None, "m:v1")
        _, _, held_out = method._twin_sets(request, method.prepared, model, DEVICE)
        rows = [next(k for k in range(len(twin_images)) if torch.equal(twin_images[k], image))
                for image in held_out.images]
        assert torch.equal(held_out.reference_logits, references[name][rows]), name
        outcome = method.unlearn(model, problem().meta, request, DEVICE, None)
        assert outcome.details["prepared"] == "memory"
        ends[name] = logits_of(outcome.model, held_out.images, DEVICE).cpu()
    lineage, own = (references[name][rows] for name in ("lineage", "version"))
    assert not torch.equal(lineage, own), "v2 must differ from v1 on the anchor's images"
    assert _kl(ends["lineage"], lineage) < _kl(ends["version"], lineage)
    assert _kl(ends["version"], own) < _kl(ends["lineage"], own)
    with pytest.raises(InvalidInputError, match="held_out_reference"):
        get_method("tmu", held_out_reference="original")


def test_the_curriculum_model_is_retrained_without_the_forgotten_ids_as_a_rebuild_on_them_is():
    parent, forget, model, data, state = _updated(inside_cf=True)
    assert state.cf_ids == tuple(i for i in parent.cf_ids if i not in set(forget))
    rebuilt = train_cf_model(model, problem().meta, data.rows(state.cf_ids), data.labels_of(state.cf_ids),
                             get_method("tmu", **FAST).options, DEVICE)
    assert all(torch.equal(state.cf_state[k], v) for k, v in rebuilt.state_dict().items())
    twin_images, twin_labels = data.tensors("twin")
    assert torch.equal(state.twin_columns["cf"], curriculum_feature(rebuilt, twin_images, twin_labels, DEVICE).cpu())


def test_the_curriculum_model_is_kept_when_it_saw_no_forgotten_id():
    parent, _, _, _, state = _updated(inside_cf=False)
    assert state.cf_ids == parent.cf_ids and state.cf_state is parent.cf_state
    assert torch.equal(state.twin_columns["cf"], parent.twin_columns["cf"])
    assert "cf_model" in state.info["kept"]


def test_the_incremental_state_is_saved_without_a_twin_model_and_reloaded_without_building(tmp_path):
    prob, parent = problem(), parent_method().prepared
    model, data = _successor(prob, _forget(parent, inside_cf=True))
    get_method("tmu", **FAST).prepare_from(parent, model, prob.meta, data, DEVICE, tmp_path)
    assert not (tmp_path / "twin_model.pt").exists()
    assert "twin_model.pt" not in json.loads((tmp_path / "manifest.json").read_text())["files"]
    later = get_method("tmu", **FAST)  # a job on v2 in another process
    later.prepare(model, prob.meta, data, DEVICE, tmp_path)
    assert later.builds == 0 and later.last_prepare == "disk" and later.prepared.twin_state == {}
    assert later.prepared.info["kind"] == "incremental"
    request = prob.forget_ids(2, 5)
    request = tuple(i for i in request if i in set(data.retain_ids))
    retain = tuple(i for i in data.retain_ids if i not in set(request))
    outcome = later.unlearn(model, prob.meta, UnlearnData(prob.source, request, retain, prob.twin_ids), DEVICE,
                            tmp_path)
    assert outcome.details["prepared"] == "memory" and later.builds == 0
    assert state_equal(later.prepared.classifier, parent.classifier)


def test_the_chain_limit_and_a_mismatched_parent_force_a_full_build():
    prob, parent = problem(), parent_method().prepared
    first_forget = _forget(parent, inside_cf=False, count=2)
    v2, data2 = _successor(prob, first_forget)
    limited = get_method("tmu", incremental_max=1, **FAST)
    assert limited.prepare_from(parent, v2, prob.meta, data2, DEVICE) == "incremental"
    v2_state = limited.prepared
    more = tuple(i for i in _forget(parent, inside_cf=False, count=4) if i not in set(first_forget))
    v3 = get_method("neg_grad", epochs=1).unlearn(v2, prob.meta, UnlearnData(
        prob.source, more, tuple(i for i in data2.retain_ids if i not in set(more)), prob.twin_ids), DEVICE,
        None).model.eval()
    data3 = UnlearnData(prob.source, (), tuple(i for i in data2.retain_ids if i not in set(more)), prob.twin_ids)
    next_one = get_method("tmu", incremental_max=1, **FAST)
    assert next_one.prepare_from(v2_state, v3, prob.meta, data3, DEVICE) == "built"
    assert next_one.builds == 1 and next_one.prepared.info["kind"] == "full" and next_one.prepared.info["chain"] == 0
    assert "incremental_max 1" in next_one.prepared.info["full_reason"]
    assert len(next_one.prepared.twin_state) > 0  # a full build makes its own twin model

    never = get_method("tmu", incremental_max=0, **FAST)
    assert never.prepare_from(parent, v2, prob.meta, data2, DEVICE) == "built"
    other_options = get_method("tmu", **{**FAST, "df_top_n": 3})
    assert other_options.prepare_from(parent, v2, prob.meta, data2, DEVICE) == "built"
    assert "other options" in other_options.prepared.info["full_reason"]
    grown = UnlearnData(prob.source, (), tuple(prob.train_ids) + prob.twin_ids[:1], prob.twin_ids[1:])
    assert get_method("tmu", **FAST).prepare_from(parent, v2, prob.meta, grown, DEVICE) == "built"


def test_incremental_max_does_not_change_the_key():
    from tmu_core.unlearn.options import TmuOptions

    assert TmuOptions(incremental_max=3, **FAST).prepare_key() == TmuOptions(**FAST).prepare_key()


# Two processes and one version: the first prepares v2 (incrementally, from v1's state) holding the artifacts
# lock; the second, a job's load step on v2, calls artifacts.prepare for the same folder meanwhile.


def _child(role: str, work: str) -> None:
    """Run one side of the two-process test (in a fresh interpreter)."""
    from tmu_core.train import load_checkpoint
    from tmu_core.unlearn import TensorSource
    from tmu_core.unlearn import tmu as tmu_module
    from tmu_core.unlearn.prepared import load_prepared

    root = Path(work)
    saved = torch.load(root / "data.pt", weights_only=True)
    source = TensorSource(saved["ids"], saved["images"], saved["labels"])
    plan = DataPlan(tuple(saved["retain"]), tuple(saved["twin"]), ())
    model, meta = load_checkpoint(root / "v2.pt", DEVICE)
    method = get_method("tmu", **FAST)
    if role == "first":
        parent = load_prepared(root / "v1")
        real = tmu_module.update_prepared

        def held(*args, **kwargs):  # runs inside the lock: let the second process arrive, then work
            (root / "holding").write_text("1")
            deadline = time.monotonic() + 60
            while not (root / "second_ready").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            return real(*args, **kwargs)

        tmu_module.update_prepared = held
        prepare(method, model, meta, source, plan, DEVICE, root / "v2", parent=parent, origin="m:v1")
    else:
        (root / "second_ready").write_text("1")
        started = time.monotonic()
        prepare(method, model, meta, source, plan, DEVICE, root / "v2")
        waited = time.monotonic() - started
    result = {"went": method.last_prepare, "builds": method.builds, "updates": method.updates,
              "finished": time.time(), "waited": waited if role == "second" else None}
    (root / f"{role}.json").write_text(json.dumps(result))


def _spawn(role: str, work: Path) -> subprocess.Popen:
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_unlearn_incremental import _child; " \
           f"_child({role!r}, {str(work)!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def test_a_second_process_waits_for_the_preparation_under_way_and_builds_nothing(tmp_path):
    from tmu_core.train import save_checkpoint
    from tmu_core.unlearn.prepared import save_prepared

    prob, parent = problem(), parent_method().prepared
    model, data = _successor(prob, _forget(parent, inside_cf=True))
    ids = list(prob.train_ids + prob.twin_ids)
    torch.save({"ids": ids, "images": prob.source.load(ids), "labels": prob.source.labels(ids),
                "retain": list(data.retain_ids), "twin": list(prob.twin_ids)}, tmp_path / "data.pt")
    save_checkpoint(tmp_path / "v2.pt", model, prob.meta)
    save_prepared(parent, tmp_path / "v1")

    first = _spawn("first", tmp_path)
    second = None
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "holding").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert (tmp_path / "holding").exists(), "the first process never started preparing"
        second = _spawn("second", tmp_path)
        assert first.wait(timeout=180) == 0 and second.wait(timeout=180) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    one = json.loads((tmp_path / "first.json").read_text())
    two = json.loads((tmp_path / "second.json").read_text())
    assert one["went"] == "incremental" and one["updates"] == 1 and one["builds"] == 0
    assert two["went"] == "disk" and two["builds"] == 0 and two["updates"] == 0
    assert two["waited"] >= 1.0 and two["finished"] >= one["finished"] - 0.5
    assert not (tmp_path / "v2" / "twin_model.pt").exists()


def test_prepare_next_updates_the_jobs_state_and_a_job_on_the_new_version_loads_it(tmp_path):
    """The pipeline's follow-up: v1's artifacts are gone (cleanup), v2's state comes from the job's method."""
    import shutil

    from test_service_support import FAST_TMU, make_index, make_v1, make_workspace
    from tmu_core.forget.artifacts import artifacts_dir, plan_data
    from tmu_core.forget.pipeline import PipelineConfig, prepare_next
    from tmu_core.index import TrainingIndex
    from tmu_core.preprocess import Preprocess
    from tmu_core.state.jobs import JobStore
    from tmu_core.state.versions import VersionRegistry
    from tmu_core.train import load_checkpoint, save_checkpoint

    ws = make_workspace(tmp_path)
    make_index(ws, tmp_path, train=8, test=4).close()
    v1 = make_v1(ws, epochs=2)
    registry = VersionRegistry(ws.state_db)
    forget = ("train/a/0000", "train/b/0001")
    job_method = get_method("tmu", **FAST_TMU)  # the job's method, v1's state in its memory
    model, meta = load_checkpoint(v1.checkpoint, DEVICE)
    with TrainingIndex.open(ws.index_dir) as index:
        view = index.view(Preprocess.from_meta(meta))
        plan = plan_data(index, 0.5, 0, registry.members("m", 1))
        prepare(job_method, model, meta, view, plan, DEVICE, artifacts_dir(ws, "m", 1))
        retain = tuple(i for i in plan.train_ids if i not in set(forget))
        unlearned = get_method("neg_grad", epochs=1).unlearn(
            model, meta, UnlearnData(view, forget, retain, plan.twin_ids), DEVICE, None).model
    checkpoint = save_checkpoint(ws.version_dir("m", 2) / "checkpoint.pt", unlearned, meta)
    registry.record_version("m", 2, v1.archive, checkpoint, None, parent=1, forget_request=None, metrics={},
                            members=retain)
    jobs = JobStore(ws.state_db)
    job = jobs.submit("m", list(forget), options={"method": "tmu", **FAST_TMU})
    jobs.set_fields(job.id, from_version=1, to_version=2)
    shutil.rmtree(artifacts_dir(ws, "m", 1))  # cleanup removed v1's artifacts before the follow-up

    prepare_next(ws, jobs.get(job.id), PipelineConfig(device="cpu"), parent=job_method)
    followup = jobs.get(job.id).followup
    assert followup["artifacts"] == "ready" and followup["preparation"] == "incremental"
    assert followup["version"] == 2 and followup["seconds"] > 0
    assert not (artifacts_dir(ws, "m", 2) / "twin_model.pt").exists()

    later = get_method("tmu", **FAST_TMU)  # the next job's load step on v2
    model2, meta2 = load_checkpoint(checkpoint, DEVICE)
    with TrainingIndex.open(ws.index_dir) as index:
        plan2 = plan_data(index, 0.5, 0, registry.members("m", 2))
        prepare(later, model2, meta2, index.view(Preprocess.from_meta(meta2)), plan2, DEVICE,
                artifacts_dir(ws, "m", 2))
    assert later.builds == 0 and later.last_prepare == "disk"
    assert later.prepared.info["parent"] == "m:v1" and later.prepared.info["chain"] == 1

    again = jobs.submit("m", ["train/c/0001"], options={"method": "tmu", **FAST_TMU})
    jobs.set_fields(again.id, from_version=1, to_version=2)
    prepare_next(ws, jobs.get(again.id), PipelineConfig(device="cpu"), parent=job_method)
    assert jobs.get(again.id).followup["preparation"] == "reused"  # v2's state is already there

    shutil.rmtree(artifacts_dir(ws, "m", 2))
    limited = jobs.submit("m", ["train/c/0002"], options={"method": "tmu", "incremental_max": 0, **FAST_TMU})
    jobs.set_fields(limited.id, from_version=1, to_version=2)
    prepare_next(ws, jobs.get(limited.id), PipelineConfig(device="cpu"), parent=job_method)
    followup = jobs.get(limited.id).followup
    assert followup["preparation"] == "full" and "incremental_max is 0" in followup["full_reason"]

    other = jobs.submit("m", ["train/c/0000"], options={"method": "retrain", "epochs": 1})
    jobs.set_fields(other.id, from_version=1, to_version=2)
    prepare_next(ws, jobs.get(other.id), PipelineConfig(device="cpu"), parent=get_method("retrain", epochs=1))
    assert jobs.get(other.id).followup["artifacts"] == "ready"  # another method: today's behaviour
