"""TMU end to end on a tiny synthetic problem: prepare/reuse, determinism, what the fine-tune does."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from test_unlearn_support import make_problem, state_equal
from tmu_core.errors import InvalidInputError
from tmu_core.unlearn import get_method
from tmu_core.unlearn.common import correct_of, model_hash, on_device

DEVICE = torch.device("cpu")
FAST = {"twin_epochs": 6, "clf_epochs": 40, "max_steps": 15}


@functools.lru_cache(maxsize=1)
def problem():
    return make_problem()


@pytest.fixture(scope="module")
def prob():
    return problem()


def _accuracy(model, data, ids):
    if not ids:
        return None
    images, labels = data.load(ids)
    return 100.0 * correct_of(model, images, labels, DEVICE).float().mean().item()


def test_tmu_unlearns_predicted_hard_and_keeps_predicted_easy(prob):
    forget = prob.forget_ids(0, 20)
    data = prob.data(forget)
    before = model_hash(prob.model)
    outcome = get_method("tmu", **FAST).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert model_hash(prob.model) == before, "the input model must not change"
    hard = outcome.predicted_hard_ids
    easy = [i for i in forget if i not in set(hard)]
    details = outcome.details
    assert details["predicted_hard"] == len(hard) and details["predicted_easy"] == len(easy) == len(forget) - len(hard)
    assert set(details["timings"]) >= {"prepare", "features_and_classifier", "fine_tune", "total"}
    assert details["stop_reason"] in ("aligned", "max_steps") and 0 <= details["steps"] <= FAST["max_steps"]
    json.dumps(details)  # reports travel as JSON
    assert hard, "the flipped-label forget samples should give the classifier something to call hard"
    assert _accuracy(outcome.model, data, hard) < _accuracy(prob.model, data, hard)
    if easy:
        assert _accuracy(outcome.model, data, easy) >= _accuracy(prob.model, data, easy) - 10.0
    if details["stop_reason"] == "aligned":
        assert _accuracy(outcome.model, data, hard) == 0.0


def test_tmu_guards_held_out_accuracy_during_its_fine_tune_of_a_small_request(prob):
    data = prob.data(prob.forget_ids(0, 20))
    twin = list(data.twin_ids)
    options = {**FAST, "guard_drop": 2.0, "guard_size": len(twin)}  # the guard measures every one of them
    tune = get_method("tmu", **options).unlearn(prob.model, prob.meta, data, DEVICE, None)
    measured = tune.details["tune"]
    assert measured["guard_accuracy_before"] == pytest.approx(_accuracy(prob.model, data, twin))
    assert measured["guard_accuracy_after"] == pytest.approx(_accuracy(tune.model, data, twin))
    assert measured["guard_accuracy_after"] >= measured["guard_accuracy_before"] - 2.0
    off = get_method("tmu", **{**options, "guard_drop": None}).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert off.details["tune"]["guard_accuracy_before"] is None and off.details["tune"]["refused_steps"] == 0
    # A request larger than guard_max_samples runs long enough to repair its early steps: no guard.
    large = get_method("tmu", **{**options, "guard_max_samples": 19}).unlearn(prob.model, prob.meta, data, DEVICE,
                                                                              None)
    assert large.details["tune"]["guard_accuracy_before"] is None
    defaults = get_method("tmu").options
    assert (defaults.guard_drop, defaults.guard_mode, defaults.guard_repairs, defaults.guard_max_samples) == (
        2.0, "repair", 20, 32)


def test_tmu_s_held_out_anchor_holds_the_twin_images_the_guard_does_not_measure(prob):
    data = prob.data(prob.forget_ids(0, 20))
    twin = list(data.twin_ids)
    options = {**FAST, "guard_drop": 2.0, "guard_size": len(twin) // 2, "min_steps": 10}
    images, _ = data.load(twin)

    def drift(model):  # KL from the prepared state's reference (the original's logits) on every twin image
        reference, now = (torch.log_softmax(m(images.float() / 255), 1) for m in (prob.model, model))
        return float(torch.nn.functional.kl_div(now, reference, log_target=True, reduction="batchmean"))

    loose = get_method("tmu", **options, held_out_weight=0.0).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert loose.details["twin_images"] == {"guard": len(twin) // 2, "held_out": 0}
    anchored = get_method("tmu", **options, held_out_weight=10.0).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert anchored.details["twin_images"] == {"guard": len(twin) // 2, "held_out": len(twin) - len(twin) // 2}
    with torch.no_grad():
        assert drift(anchored.model) < drift(loose.model) / 2
    assert get_method("tmu").options.held_out_weight == 10.0


def test_a_guard_that_takes_every_twin_image_says_the_held_out_anchor_is_left_with_none(prob, caplog):
    data = prob.data(prob.forget_ids(0, 10))
    twin = len(data.twin_ids)
    options = {**FAST, "guard_drop": 2.0, "held_out_weight": 10.0, "max_steps": 2}
    with caplog.at_level("WARNING", logger="tmu_core.unlearn.tmu"):
        split = get_method("tmu", **options, guard_size=twin - 1).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert split.details["twin_images"] == {"guard": twin - 1, "held_out": 1}
    assert "held-out anchor gets none" not in caplog.text
    with caplog.at_level("WARNING", logger="tmu_core.unlearn.tmu"):
        whole = get_method("tmu", **options, guard_size=twin).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert whole.details["twin_images"] == {"guard": twin, "held_out": 0}
    assert f"reserves all {twin} twin images" in caplog.text and f"guard_size below {twin}" in caplog.text


def test_tmu_hard_predictions_follow_the_constructed_labels(prob):
    """Flipped-label samples are hard by construction; the classifier must find them better than chance. (The
    construction ignores that a gold without 30 of a class's 40 samples loses more of it: no prior shift.)"""
    forget = prob.forget_ids(1, 30, seed=1)
    options = {**FAST, "max_steps": 1, "prior_shift": False}
    outcome = get_method("tmu", **options).unlearn(prob.model, prob.meta, prob.data(forget), DEVICE, None)
    predicted = [i in set(outcome.predicted_hard_ids) for i in forget]
    truth = [i in prob.flipped for i in forget]
    agree = sum(p == t for p, t in zip(predicted, truth)) / len(forget)
    majority = max(sum(truth), len(truth) - sum(truth)) / len(forget)
    assert agree >= majority, f"ACC_gl {agree:.2f} below the majority-class rate {majority:.2f}"


def test_same_seed_gives_the_same_weights_and_another_seed_does_not(prob):
    data = prob.data(prob.forget_ids(2, 15))
    runs = [get_method("tmu", seed=seed, **FAST).unlearn(prob.model, prob.meta, data, DEVICE, None)
            for seed in (0, 0, 1)]
    assert state_equal(runs[0].model, runs[1].model)
    assert runs[0].predicted_hard_ids == runs[1].predicted_hard_ids
    assert not state_equal(runs[0].model, runs[2].model)


def test_prepare_is_reused_from_memory_and_from_disk(prob, tmp_path):
    forget = prob.forget_ids(3, 10)
    data = prob.data(forget)
    prep = prob.data(())
    first = get_method("tmu", **FAST)
    first.prepare(prob.model, prob.meta, prep, DEVICE, tmp_path)
    assert first.builds == 1
    assert {p.name for p in tmp_path.iterdir()} >= {"manifest.json", "twin_model.pt", "cf_model.pt",
                                                      "train_features.pt", "twin_problem.pt", "classifier.pt"}
    outcome = first.unlearn(prob.model, prob.meta, data, DEVICE, tmp_path)
    assert outcome.details["prepared"] == "memory" and first.builds == 1

    second = get_method("tmu", **FAST)  # a new process would start like this
    again = second.unlearn(prob.model, prob.meta, data, DEVICE, tmp_path)
    assert again.details["prepared"] == "disk" and second.builds == 0
    assert state_equal(outcome.model, again.model)
    assert again.details["timings"]["prepare"] < outcome.details["prepared_info"]["timings"]["total"]


def test_a_prepared_state_of_the_previous_format_is_rebuilt_not_read(prob, tmp_path):
    """A state written before the twin logits were kept (format 3: no ``logits``, no ``reference_counts``) is left
    unread: the next request builds the state again and runs, and the folder then holds the current format."""
    import json

    import tmu_core.unlearn.prepared as prepared_module

    prep = prob.data(())
    get_method("tmu", **FAST).prepare(prob.model, prob.meta, prep, DEVICE, tmp_path)
    twin_file = tmp_path / "twin_problem.pt"
    old = torch.load(twin_file, weights_only=True)
    torch.save({k: v for k, v in old.items() if k not in ("logits", "reference_counts")}, twin_file)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": 3}))
    later = get_method("tmu", **FAST)
    outcome = later.unlearn(prob.model, prob.meta, prob.data(prob.forget_ids(1, 10)), DEVICE, tmp_path)
    assert outcome.details["prepared"] == "built" and later.builds == 1
    assert json.loads((tmp_path / "manifest.json").read_text())["format"] == prepared_module.FORMAT
    assert "logits" in torch.load(twin_file, weights_only=True)


def test_prepare_rebuilds_when_the_model_or_options_change(prob, tmp_path):
    prep = prob.data(())
    get_method("tmu", **FAST).prepare(prob.model, prob.meta, prep, DEVICE, tmp_path)
    changed = get_method("tmu", **{**FAST, "df_top_n": 3})
    changed.prepare(prob.model, prob.meta, prep, DEVICE, tmp_path)
    assert changed.builds == 1
    tuned_only = get_method("tmu", **{**FAST, "df_top_n": 3, "noise_std": 2.0})  # a fine-tune option
    tuned_only.prepare(prob.model, prob.meta, prep, DEVICE, tmp_path)
    assert tuned_only.builds == 0
    other_model = get_method("neg_grad", epochs=1).unlearn(prob.model, prob.meta, prob.data(prob.forget_ids(0, 5)),
                                                          DEVICE, None).model
    tuned_only.prepare(other_model, prob.meta, prep, DEVICE, tmp_path)
    assert tuned_only.builds == 1


def test_cf_per_request_retrains_the_curriculum_model(prob):
    data = prob.data(prob.forget_ids(0, 12))
    outcome = get_method("tmu", cf_per_request=True, **FAST).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert outcome.details["cf_model"] == "per_request" and outcome.details["cf_seconds"] > 0


@pytest.mark.parametrize("features", [("df",), ("af",), ("cf",), ("df", "cf"), ("df", "af", "cf")])
def test_feature_subsets_run(prob, features):
    data = prob.data(prob.forget_ids(1, 8))
    outcome = get_method("tmu", features=features, **{**FAST, "max_steps": 2}).unlearn(
        prob.model, prob.meta, data, DEVICE, None)
    assert outcome.details["features"] == list(features)


def test_twin_variants_run_and_report_their_fit(prob):
    data = prob.data(prob.forget_ids(2, 8))
    outcome = get_method("tmu", twin_retain_mix=1.0, twin_target_accuracy=0.9, **{**FAST, "max_steps": 2}).unlearn(
        prob.model, prob.meta, data, DEVICE, None)
    fit = outcome.details["prepared_info"]["twin_fit"]
    assert fit["target_accuracy"] == pytest.approx(90.0)
    assert fit["fit_accuracy"] >= 90.0 or fit["epochs"] == FAST["twin_epochs"]


def test_on_device_copies_instead_of_moving():
    model = torch.nn.Linear(3, 2)
    assert on_device(model, torch.device("cpu")) is model
    moved = on_device(model, torch.device("meta"))  # any other device: a copy goes there, the input stays
    assert moved is not model and moved.weight.device.type == "meta" and model.weight.device.type == "cpu"


def test_tmu_input_errors(prob):
    with pytest.raises(InvalidInputError, match="forget_ids is empty"):
        get_method("tmu", **FAST).unlearn(prob.model, prob.meta, prob.data(()), DEVICE, None)
    forget = prob.forget_ids(0, 3)
    no_twin = type(prob.data(()))(prob.source, forget, [i for i in prob.train_ids if i not in forget], ())
    with pytest.raises(InvalidInputError, match="needs twin_ids"):
        get_method("tmu", **FAST).unlearn(prob.model, prob.meta, no_twin, DEVICE, None)


@pytest.mark.gpu
def test_tmu_runs_on_cuda(prob):
    device = torch.device("cuda")
    data = prob.data(prob.forget_ids(0, 20))
    outcome = get_method("tmu", **FAST).unlearn(prob.model, prob.meta, data, device, None)
    assert next(outcome.model.parameters()).device.type == "cuda"
    hard = outcome.predicted_hard_ids
    if hard:
        images, labels = data.load(hard)
        after = correct_of(outcome.model, images, labels, device).float().mean().item()
        before = correct_of(prob.model.to(device), images, labels, device).float().mean().item()
        assert after < before


@pytest.mark.parametrize("value, shown", [("None", "got 'None' (JSON null"), ("1.5", "got '1.5'"),
                                          (float("nan"), "got nan"), (True, "got True")])
def test_a_numeric_option_given_a_non_number_is_refused_with_what_is_accepted(value, shown):
    with pytest.raises(InvalidInputError, match="guard_drop must be a number >= 0.0 and <= 100.0") as err:
        get_method("tmu", guard_drop=value)
    assert shown in str(err.value)


def test_null_still_turns_the_guard_off():
    assert get_method("tmu", guard_drop=None) is not None


def test_easy_targets_are_the_chosen_quantile_of_held_out_margins_of_the_class(prob):
    from tmu_core.unlearn.common import logits_of
    from tmu_core.unlearn.forget_tune import logit_margin

    data = prob.data(prob.forget_ids(0, 20))
    _, labels = data.tensors("forget")
    twin_images, twin_labels = data.tensors("twin")
    margins = logit_margin(logits_of(prob.model, twin_images, DEVICE), twin_labels)
    targets = {}
    for quantile in (0.2, 0.5):
        method = get_method("tmu", easy_quantile=quantile, **FAST)
        method.prepare(prob.model, prob.meta, data, DEVICE)  # the prepared state holds M_o's held-out margins
        targets[quantile] = method._easy_targets(method.prepared, data, labels)
    for label in labels.unique().tolist():
        mine = margins[(margins > 0) & (twin_labels == label)]
        median = float(mine.median())
        assert targets[0.5][labels == label].eq(median).all()
        assert bool((targets[0.2][labels == label] <= median).all())
    assert float(targets[0.2].mean()) < float(targets[0.5].mean())
    with pytest.raises(InvalidInputError, match="easy_quantile must be >= 0.0 and <= 1.0"):
        get_method("tmu", easy_quantile=1.5)


def test_a_request_that_takes_most_of_a_class_counts_fewer_easy_samples_by_the_prior_shift(prob):
    """30 of class 1's training samples: the gold keeps a quarter of the class, so its easy count is scaled by
    the factor ``shift_scale`` gives from M_o's twin logits; a run without the shift keeps more samples easy."""
    from tmu_core.unlearn.common import logits_of
    from tmu_core.unlearn.easy_hard import shift_scale

    data = prob.data(prob.forget_ids(1, 30, seed=1))
    shifted = get_method("tmu", **FAST).unlearn(prob.model, prob.meta, data, DEVICE, None).details
    plain = get_method("tmu", prior_shift=False, **FAST).unlearn(prob.model, prob.meta, data, DEVICE, None).details
    assert plain["prior_shift"] is None
    info = shifted["prior_shift"]
    twin_images, twin_labels = data.tensors("twin")
    kept, trained = (torch.bincount(data.labels_of(ids), minlength=4) for ids in (data.retain_ids, data.training_ids))
    share = kept.float() / trained.float()
    factors, temperature = shift_scale(logits_of(prob.model, twin_images, DEVICE).cpu(), twin_labels, share)
    assert info["classes"] == {1: {"kept_share": round(float(share[1]), 4), "factor": round(float(factors[1]), 4)}}
    assert info["temperature"] == temperature and share[1] < 0.35 and float(factors[1]) < 1.0
    assert shifted["predicted_easy"] < plain["predicted_easy"]
    json.dumps(shifted)
