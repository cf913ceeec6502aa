"""Unit tests of the unlearning building blocks: data, registry, options, features, classifier, fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tmu_core.device import generator
from tmu_core.errors import DivergedError, InvalidInputError, UnknownIdsError
from tmu_core.unlearn import (TensorSource, UnlearnData, UnlearnMethod, get_method, list_methods,
                              parse_method_spec, register_method)
from tmu_core.unlearn.easy_hard import (ClassifierConfig, fit_classifier, fit_temperature, label_accuracy,
                                        predict_easy, select_easy, shift_scale)
from tmu_core.unlearn.features import adversarial_feature, assemble, class_prior, distance_feature
from tmu_core.unlearn.forget_tune import TuneConfig, TuneSet, easy_loss, forget_finetune, hard_loss, logit_margin

DEVICE = torch.device("cpu")


def _source(n: int = 12) -> TensorSource:
    gen = generator(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8)
    return TensorSource([f"s{i}" for i in range(n)], images, torch.arange(n) % 3)


# --- data and registry ---------------------------------------------------------------------------------


def test_unlearn_data_rejects_overlapping_sets():
    with pytest.raises(InvalidInputError, match="both forget_ids and retain_ids"):
        UnlearnData(_source(), ["s0", "s1"], ["s1", "s2"], ["s3"])
    with pytest.raises(InvalidInputError, match="both retain_ids and twin_ids"):
        UnlearnData(_source(), ["s0"], ["s1", "s2"], ["s2"])


def test_unlearn_data_rejects_a_string_and_duplicates():
    with pytest.raises(InvalidInputError, match="list of sample ids"):
        UnlearnData(_source(), "s0", ["s1"], [])
    with pytest.raises(InvalidInputError, match="more than once: s1"):
        UnlearnData(_source(), ["s0"], ["s1", "s1"], [])


def test_unlearn_data_loads_each_part_once_and_serves_subsets_from_it():
    calls = []

    class Counting(TensorSource):
        def load(self, ids):
            calls.append(list(ids))
            return super().load(ids)

    src = _source()
    data = UnlearnData(Counting([f"s{i}" for i in range(12)], src.load([f"s{i}" for i in range(12)]),
                                torch.arange(12) % 3), ["s0", "s1"], ["s2", "s3", "s4"], ["s5"])
    images, labels = data.tensors("retain")
    again, _ = data.tensors("retain")
    assert images is again and len(calls) == 1
    sub_images, sub_labels = data.load(["s4", "s2"])
    assert len(calls) == 1
    assert torch.equal(sub_images, images[[2, 0]]) and sub_labels.tolist() == [labels[2].item(), labels[0].item()]
    with pytest.raises(InvalidInputError, match="expected one of forget, retain, twin"):
        data.tensors("test")


def test_tensor_source_names_unknown_ids():
    with pytest.raises(UnknownIdsError, match="nope"):
        _source().load(["s0", "nope"])


def test_registry_lists_every_method():
    assert set(list_methods()) >= {"tmu", "retrain", "finetune", "neg_grad", "random_label", "bad_teacher", "fisher",
                                  "scrub"}


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(InvalidInputError) as err:
        get_method("scrubber")
    assert "unknown unlearning method 'scrubber'" in str(err.value)
    assert "bad_teacher" in str(err.value) and "tmu" in str(err.value)


def test_parse_method_spec_reads_json_values_and_keeps_lists_whole():
    assert parse_method_spec("finetune") == ("finetune", {})
    name, options = parse_method_spec('tmu:features=["df","cf"],noise_std=0,easy_rule=threshold,cf_per_request=true')
    assert name == "tmu"
    assert options == {"features": ["df", "cf"], "noise_std": 0, "easy_rule": "threshold", "cf_per_request": True}
    with pytest.raises(InvalidInputError, match="has no method name"):
        parse_method_spec(":lr=1")
    with pytest.raises(InvalidInputError, match="'lr' is not key=value"):
        parse_method_spec("tmu:lr")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(InvalidInputError, match=r"unknown option\(s\) nosie_std for method 'tmu'.*noise_std"):
        get_method("tmu", nosie_std=3)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("tmu", {"noise_std": -1.0}, "noise_std must be >= 0"),
        ("tmu", {"features": ("df", "xf")}, "features must be a non-empty, duplicate-free subset of df, af, cf"),
        ("tmu", {"features": ()}, "features must be a non-empty"),
        ("tmu", {"hard_objective": "ascent"}, "hard_objective must be one of 'margin', 'ce_clamp'"),
        ("tmu", {"clf_loss": "mse"}, "clf_loss must be one of 'bce', 'ce'"),
        ("tmu", {"cf_subset": 1.5}, "cf_subset must be >= 0.0 and <= 1.0"),
        ("tmu", {"max_steps": 0}, "max_steps must be >= 1"),
        ("tmu", {"clf_members": 0}, "members must be >= 1"),
        ("tmu", {"easy_rule": "median"}, "easy_rule must be one of 'threshold', 'expected'"),
        ("tmu", {"optimizer": "rmsprop"}, "optimizer must be one of 'sgd', 'adam'"),
        ("tmu", {"retain_loss": "mse"}, "retain_loss must be one of 'ce', 'kl'"),
        ("tmu", {"twin_target_accuracy": 1.5}, "twin_target_accuracy must be >= 0.0 and <= 1.0"),
        ("tmu", {"easy_slack": -0.1}, "easy_slack must be >= 0"),
        ("finetune", {"epochs": 0}, "finetune: epochs must be >= 1"),
        ("neg_grad", {"lr": 0.0}, "neg_grad: lr must be > 0.0"),
        ("bad_teacher", {"retain_fraction": 2.0}, "retain_fraction must be >= 0.0 and <= 1.0"),
        ("scrub", {"max_epochs": 5}, "scrub: max_epochs must be >= 0 and <= 3"),
        ("fisher", {"alpha": -1e-6}, "fisher: alpha must be > 0.0"),
        ("retrain", {"epochs": 0}, "retrain: epochs must be >= 1"),
    ],
)
def test_bad_options_are_rejected_with_a_clear_message(name, options, message):
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_method(name, **options)


def test_duplicate_registration_raises():
    with pytest.raises(InvalidInputError, match="already registered"):

        @register_method("tmu")
        class Again(UnlearnMethod):  # pragma: no cover - never instantiated
            def unlearn(self, model, meta, data, device, workdir=None):
                raise NotImplementedError


# --- features ------------------------------------------------------------------------------------------


def test_distance_feature_matches_brute_force_and_sorts():
    gen = generator(1)
    query, reference = torch.randn(5, 4, generator=gen), torch.randn(9, 4, generator=gen)
    labels_q, labels_r = torch.tensor([0, 1, 0, 1, 0]), torch.tensor([0, 1] * 4 + [0])
    got = distance_feature(query, labels_q, reference, labels_r, top_n=3)
    brute = torch.cdist(query, reference).sort(dim=1).values[:, :3]
    torch.testing.assert_close(got, brute)
    same = distance_feature(query, labels_q, reference, labels_r, top_n=3, same_class=True)
    for row in range(5):
        pool = reference[labels_r == labels_q[row]]
        torch.testing.assert_close(same[row], torch.cdist(query[row:row + 1], pool).sort().values[0, :3])
    assert bool((same >= got - 1e-6).all())  # a restricted pool is never closer


def test_distance_feature_normalises_and_pads_short_pools():
    query, reference = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 5.0], [10.0, 0.0]])
    normalised = distance_feature(query, torch.zeros(1), reference, torch.zeros(2), top_n=3, normalise=True)
    torch.testing.assert_close(normalised, torch.tensor([[0.0, 2 ** 0.5, 2 ** 0.5]]))
    with pytest.raises(InvalidInputError, match="top_n must be >= 1"):
        distance_feature(query, torch.zeros(1), reference, torch.zeros(2), top_n=0)


class _Linear(nn.Module):
    """Two-class linear model on the first pixel: logit gap = 40 * (x - 0.5)."""

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        v = x01.flatten(1)[:, :1]
        return torch.cat([20 * (0.5 - v), 20 * (v - 0.5)], dim=1)


def test_adversarial_feature_is_larger_near_the_boundary():
    # First pixel 130/255 sits just past the boundary at 0.5 (flipped by eps = 4/255); 250/255 is far away.
    images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 130, 250
    labels = torch.tensor([1, 1])
    af = adversarial_feature(_Linear(), images, labels, DEVICE, eps=4 / 255, steps=4)
    assert af[0] > 0.5 and 0 <= af[1] < 0.01
    clean_only = adversarial_feature(_Linear(), images, labels, DEVICE, eps=1e-9, steps=1)
    assert bool((af >= clean_only - 1e-5).all())


def test_assemble_orders_columns_and_logs_losses():
    cols = {"df": torch.ones(3, 2), "af": torch.full((3,), 1.0), "cf": torch.full((3,), 2.0)}
    out = assemble(cols, ("cf", "df"), log_losses=True)
    assert out.shape == (3, 3)
    torch.testing.assert_close(out[:, 0], torch.log(torch.full((3,), 2.0 + 1e-6)))


def test_class_prior_is_the_class_easy_share_leaving_the_sample_out():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    easy = torch.tensor([1, 1, 1, 0, 0, 1, 1]).bool()
    rates, loo = class_prior(labels, easy, num_classes=4)
    torch.testing.assert_close(rates[:2], torch.tensor([0.75, 0.5]))
    overall = easy.float().mean()
    torch.testing.assert_close(rates[2:], overall.repeat(2))  # one sample, and none: the overall share
    torch.testing.assert_close(loo, torch.tensor([2 / 3, 2 / 3, 2 / 3, 1.0, 1.0, 0.0, overall.item()]))


# --- easy/hard classifier ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_classifier_beats_chance_on_a_separable_split(loss):
    gen = generator(2)
    easy = torch.rand(400, generator=gen) < 0.6
    centre = torch.where(easy[:, None], torch.tensor([1.0, -1.0, 0.5]), torch.tensor([-1.0, 1.0, 0.0]))
    features = centre * 50 + 20 * torch.randn(400, 3, generator=gen) + 300  # unscaled: standardisation matters
    clf = fit_classifier(features[:300], easy[:300], ClassifierConfig(epochs=30, loss=loss))
    held_out = label_accuracy(predict_easy(clf, features[300:]), easy[300:])
    majority = 100.0 * max(easy[300:].float().mean().item(), 1 - easy[300:].float().mean().item())
    assert held_out > majority + 15


def test_classifier_ensemble_averages_its_members():
    gen = generator(5)
    features, easy = torch.randn(60, 3, generator=gen), torch.rand(60, generator=gen) < 0.5
    clf = fit_classifier(features, easy, ClassifierConfig(epochs=5, members=4))
    per_member = torch.sigmoid(clf.member_logits(features)[..., 0])  # (E, N)
    assert per_member.shape == (4, 60)
    assert not torch.allclose(per_member[0], per_member[1])  # members differ
    torch.testing.assert_close(clf.easy_probability(features), per_member.mean(dim=0))
    again = fit_classifier(features, easy, ClassifierConfig(epochs=5, members=4))
    torch.testing.assert_close(again.easy_probability(features), clf.easy_probability(features))


def test_expected_rule_keeps_the_expected_easy_count_and_picks_the_most_probable():
    probability = torch.tensor([0.7, 0.9, 0.6, 0.75, 0.65, 0.8, 0.7, 0.7, 0.55, 0.85])
    assert select_easy(probability, "threshold").all()  # every sample clears 0.5
    easy = select_easy(probability, "expected")
    assert int(easy.sum()) == round(probability.sum().item()) == 7
    assert probability[easy].min() >= probability[~easy].max()
    assert not select_easy(torch.full((5,), 0.05), "expected").any()
    with pytest.raises(InvalidInputError, match="rule must be one of 'threshold', 'expected', 'prior'"):
        select_easy(probability, "median")


def test_prior_rule_counts_by_the_class_priors_and_ranks_by_the_classifier():
    """Ten samples the classifier finds 72% easy on average, of a class whose held-out images are 40% easy: four
    are labelled easy, the four most probable."""
    probability = torch.tensor([0.7, 0.9, 0.6, 0.75, 0.65, 0.8, 0.7, 0.7, 0.55, 0.85])
    easy = select_easy(probability, "prior", torch.full((10,), 0.4))
    assert int(easy.sum()) == 4 and set(easy.nonzero().squeeze(1).tolist()) == {1, 9, 5, 3}
    mixed = select_easy(probability, "prior", torch.tensor([0.9] * 5 + [0.1] * 5))
    assert int(mixed.sum()) == 5
    with pytest.raises(InvalidInputError, match="rule 'prior' needs one class prior a sample"):
        select_easy(probability, "prior")


def test_a_scale_multiplies_the_probabilities_and_priors_before_the_rule():
    probability = torch.tensor([0.9, 0.8, 0.6, 0.4])
    half = torch.full((4,), 0.5)
    assert int(select_easy(probability, "expected").sum()) == 3
    assert select_easy(probability, "expected", scale=half).tolist() == [True, False, False, False]  # round(1.35)
    assert not select_easy(probability, "threshold", scale=half).any()  # 0.45 at most
    assert int(select_easy(probability, "prior", torch.full((4,), 0.8), scale=half).sum()) == 2  # 4 x 0.4
    assert select_easy(probability, "expected", scale=torch.full((4,), 3.0)).all()  # clamped to 1
    with pytest.raises(InvalidInputError, match="scale must have one factor a sample \\(\\(4,\\)\\), got \\(3,\\)"):
        select_easy(probability, "expected", scale=torch.ones(3))


def test_temperature_scaling_finds_how_overconfident_the_logits_are():
    gen = generator(0)
    logits = 2.0 * torch.randn(4000, 5, generator=gen)
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=gen).squeeze(1)  # calibrated at T = 1
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.1)
    assert fit_temperature(3.0 * logits, labels) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(InvalidInputError, match="fit_temperature: expected \\(N, K\\) logits and \\(N,\\) labels"):
        fit_temperature(logits, labels[:10])


def test_the_prior_shift_lowers_a_class_by_the_share_of_its_images_within_log_w_of_the_boundary():
    """Class 0 keeps half its training samples: its logit moves by log(1/2) (at the fitted temperature), and
    every class-0 twin image correct by less than that margin turns wrong; a shift shared by every class changes
    nothing."""
    gen = generator(1)
    logits = 2.0 * torch.randn(600, 3, generator=gen)
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=gen).squeeze(1)
    factors, temperature = shift_scale(logits, labels, torch.ones(3))
    assert factors.tolist() == [1.0, 1.0, 1.0] and temperature == pytest.approx(1.0, rel=0.15)
    assert shift_scale(logits, labels, torch.full((3,), 0.3))[0].tolist() == [1.0, 1.0, 1.0]

    factors, temperature = shift_scale(logits, labels, torch.tensor([0.5, 1.0, 1.0]))
    margins = logit_margin(logits, labels) / temperature
    mine = (labels == 0) & (margins > 0)
    assert factors[0].item() == pytest.approx((margins[mine] > torch.log(torch.tensor(2.0))).float().mean().item())
    assert 0.0 < factors[0].item() < 1.0 and bool((factors[1:] >= 1.0).all())
    assert shift_scale(logits, labels, torch.tensor([0.0, 1.0, 1.0]))[0][0].item() == 0.0  # a class forgotten whole
    with pytest.raises(InvalidInputError, match="expected one kept share a class \\(3\\), got \\(2,\\)"):
        shift_scale(logits, labels, torch.ones(2))


def test_classifier_rejects_bad_shapes():
    with pytest.raises(InvalidInputError, match="expected \\(N, F\\) features and \\(N,\\) labels"):
        fit_classifier(torch.zeros(4, 2), torch.zeros(3), ClassifierConfig())
    with pytest.raises(InvalidInputError, match="hidden must be positive"):
        ClassifierConfig(hidden=(64, 0))


# --- bounded fine-tune ---------------------------------------------------------------------------------


def test_bounded_hard_objectives_stop_pushing():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    cfg = TuneConfig(margin=1.0)
    hard_loss(logits, labels, cfg).backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0  # sample 1 already past the margin
    logits.grad = None
    hard_loss(logits, labels, TuneConfig(hard_objective="ce_clamp", ascent_cap=2.0)).backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0  # sample 1's loss is over the cap


def _two_blob_model() -> tuple[nn.Module, TuneSet, TuneSet]:
    """Blobs at pixel 50 (class 0) and 200 (class 1) plus three class-0 samples at 120, near the boundary."""
    gen = generator(3)
    with torch.random.fork_rng(devices=[]):  # the same weights whatever ran before
        torch.manual_seed(3)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.cat([torch.full((8, 3, 2, 2), 50), torch.full((8, 3, 2, 2), 200), torch.full((3, 3, 2, 2), 120)])
    x = (x.float() + torch.randn(x.shape, generator=gen) * 10).clamp(0, 255).to(torch.uint8)
    y = torch.tensor([0] * 8 + [1] * 8 + [0] * 3)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        loss = nn.functional.cross_entropy(model(x.float() / 255), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    hard_rows, easy_rows = torch.tensor([16, 17, 18]), torch.tensor([0, 1, 2, 8, 9, 10])
    return model, TuneSet(x[hard_rows], y[hard_rows]), TuneSet(x[easy_rows], y[easy_rows])


@pytest.mark.parametrize("objective", ["margin", "ce_clamp"])
def test_forget_finetune_misclassifies_hard_and_keeps_easy(objective):
    model, hard, easy = _two_blob_model()
    cfg = TuneConfig(lr=0.05, max_steps=200, hard_objective=objective, noise_std=4.0, optimizer="sgd",
                     retain_weight=0.0)
    result = forget_finetune(model, hard, easy, None, cfg, DEVICE)
    assert result.hard_accuracy_before == 100.0 and result.easy_accuracy_before == 100.0
    assert result.stop_reason == "aligned" and result.steps < 200
    assert result.hard_accuracy_after == 0.0 and result.easy_accuracy_after == 100.0
    with torch.no_grad():
        assert bool((model(hard.images.float() / 255).argmax(1) != hard.labels).all())


def test_easy_margin_targets_make_memorised_samples_less_confident_but_correct():
    def margins(model, part):
        with torch.no_grad():
            return logit_margin(model(part.images.float() / 255), part.labels)

    cfg = TuneConfig(lr=0.01, max_steps=40, min_steps=40, optimizer="adam", retain_weight=0.0)
    plain, hard, easy = _two_blob_model()
    no_hard = TuneSet(hard.images[:0], hard.labels[:0])
    before = margins(plain, easy)
    target = torch.full_like(before, 2.0)
    assert bool((before > 5.0).all())  # memorised
    targeted = copy.deepcopy(plain)
    forget_finetune(plain, no_hard, easy, None, cfg, DEVICE)
    result = forget_finetune(targeted, no_hard, TuneSet(easy.images, easy.labels, target), None, cfg, DEVICE)
    assert result.steps == 40 and result.easy_accuracy_after == 100.0
    after = margins(targeted, easy)
    assert (after - target).abs().mean() < (before - target).abs().mean() / 2
    assert after.mean() < margins(plain, easy).mean() / 2


def test_easy_slack_keeps_tuning_until_the_easy_samples_are_near_their_targets():
    cfg = TuneConfig(lr=0.01, max_steps=200, optimizer="adam", retain_weight=0.0, noise_std=0.0)
    model, hard, _ = _two_blob_model()
    _, _, easy = _two_blob_model()
    no_hard = TuneSet(hard.images[:0], hard.labels[:0])
    with torch.no_grad():
        start = logit_margin(model(easy.images.float() / 255), easy.labels)
    easy = TuneSet(easy.images, easy.labels, torch.full_like(start, 2.0))
    assert float((start - 2.0).clamp(min=0).mean()) > 3.0  # memorised: far above the target
    unchecked = forget_finetune(copy.deepcopy(model), no_hard, easy, None, cfg, DEVICE)
    assert unchecked.stop_reason == "aligned" and unchecked.steps == 0 and unchecked.easy_excess_after > 3.0
    slack = TuneConfig(**{**cfg.__dict__, "easy_slack": 0.5})
    result = forget_finetune(model, no_hard, easy, None, slack, DEVICE)
    assert result.stop_reason == "aligned" and 0 < result.steps < 200
    assert result.easy_excess_after <= 0.5 and result.easy_accuracy_after == 100.0
    with torch.no_grad():
        after = logit_margin(model(easy.images.float() / 255), easy.labels)
    assert float((after - 2.0).clamp(min=0).mean()) == pytest.approx(result.easy_excess_after, abs=1e-5)


def test_tolerance_stops_once_few_enough_samples_are_misaligned():
    model, hard, easy = _two_blob_model()  # 3 hard samples, all correct at the start, of 9 forget samples
    strict = forget_finetune(copy.deepcopy(model), hard, easy, None, TuneConfig(lr=1e-8, max_steps=3, tolerance=0.0),
                             DEVICE)
    assert strict.stop_reason == "max_steps"
    loose = forget_finetune(model, hard, easy, None, TuneConfig(lr=1e-8, max_steps=3, tolerance=0.34), DEVICE)
    assert loose.stop_reason == "aligned" and loose.steps == 0 and loose.hard_accuracy_after == 100.0


def test_forget_finetune_stops_at_max_steps():
    model, hard, easy = _two_blob_model()
    result = forget_finetune(model, hard, easy, None, TuneConfig(lr=1e-8, max_steps=3, tolerance=0.0), DEVICE)
    assert result.stop_reason == "max_steps" and result.steps == 3


def test_a_fine_tune_whose_loss_stops_being_a_number_raises_instead_of_returning_a_broken_model():
    model, hard, easy = _two_blob_model()
    with pytest.raises(DivergedError, match=r"diverged at step 1: its loss is (nan|inf).*'sgd', lr 1e\+30.*Lower"):
        forget_finetune(model, hard, easy, None, TuneConfig(lr=1e30, max_steps=5, tolerance=0.0, optimizer="sgd",
                                                            retain_weight=0.0), DEVICE)


def _guard_near_the_hard_samples(pixel: int) -> TuneSet:
    """Twelve held-out class-0 images at ``pixel``, between the class-0 blob (50) and the hard samples (120)."""
    gen = generator(5)
    images = (torch.full((12, 3, 2, 2), pixel).float() + torch.randn((12, 3, 2, 2), generator=gen) * 5)
    return TuneSet(images.clamp(0, 255).to(torch.uint8), torch.zeros(12, dtype=torch.long))


def _guard_accuracy(model: nn.Module, guard: TuneSet) -> float:
    with torch.no_grad():
        return 100.0 * (model(guard.images.float() / 255).argmax(1) == guard.labels).float().mean().item()


def test_the_guard_takes_back_steps_that_cost_held_out_accuracy():
    model, hard, easy = _two_blob_model()
    guard = _guard_near_the_hard_samples(100)
    cfg = TuneConfig(lr=0.3, max_steps=50, optimizer="sgd", retain_weight=0.0, noise_std=0.0, easy_weight=0.0,
                     margin=8.0)
    assert _guard_accuracy(model, guard) == 100.0
    unguarded = copy.deepcopy(model)
    forget_finetune(unguarded, hard, easy, None, cfg, DEVICE)
    assert _guard_accuracy(unguarded, guard) == 0.0  # the fault: the boundary moved past the held-out images
    result = forget_finetune(model, hard, easy, None, TuneConfig(**{**cfg.__dict__, "guard_drop": 0.0}), DEVICE,
                             guard=guard)
    assert result.refused_steps >= 1 and result.stop_reason == "aligned" and result.hard_accuracy_after == 0.0
    assert result.guard_accuracy_before == result.guard_accuracy_after == _guard_accuracy(model, guard) == 100.0


def test_the_guard_stops_the_run_when_even_the_smallest_step_costs_too_much():
    model, hard, easy = _two_blob_model()
    guard = _guard_near_the_hard_samples(110)
    before = copy.deepcopy(model.state_dict())
    cfg = TuneConfig(lr=1.0, max_steps=50, optimizer="sgd", retain_weight=0.0, noise_std=0.0, easy_weight=0.0,
                     margin=8.0, guard_drop=0.0, guard_halvings=2)
    result = forget_finetune(model, hard, easy, None, cfg, DEVICE, guard=guard)
    assert result.stop_reason == "guard" and result.steps == 0 and result.refused_steps == 3
    assert result.hard_accuracy_after == 100.0  # measured on the weights kept, which are the start's
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_the_repair_guard_keeps_forgetting_and_repairs_what_a_step_cost():
    """guard_mode="repair": a step that costs held-out accuracy is kept, and steps on retained samples alone
    follow until the guard set is back, and the run still ends aligned."""
    model, hard, easy = _two_blob_model()
    guard = _guard_near_the_hard_samples(95)
    near = _guard_near_the_hard_samples(90)  # retained class-0 samples on the guard images' side of the boundary
    retain = TuneSet(torch.cat([near.images, easy.images]), torch.cat([near.labels, easy.labels]))
    cfg = TuneConfig(lr=0.3, max_steps=60, optimizer="sgd", noise_std=0.0, easy_weight=0.0, margin=8.0,
                     retain_weight=1.0, retain_loss="ce", retain_batch=64, guard_drop=0.0, guard_mode="repair",
                     guard_repairs=20)
    unguarded = copy.deepcopy(model)
    forget_finetune(unguarded, hard, easy, retain, TuneConfig(**{**cfg.__dict__, "retain_weight": 0.0}), DEVICE)
    assert _guard_accuracy(unguarded, guard) < 100.0  # the fault the guard is for
    result = forget_finetune(model, hard, easy, retain, cfg, DEVICE, guard=guard)
    assert result.stop_reason == "aligned" and result.hard_accuracy_after == 0.0
    assert result.refused_steps >= 1  # repair steps were taken
    assert result.guard_accuracy_after == _guard_accuracy(model, guard) == 100.0


def test_a_guard_level_above_the_start_repairs_drift_that_earlier_requests_left():
    """A model that earlier requests left below the level its lineage had: with ``guard_level`` the repair steps
    bring the guard set back to that level, and the request still ends aligned; without it the guard keeps only
    the drifted start."""
    model, hard, easy = _two_blob_model()
    guard = _guard_near_the_hard_samples(95)
    near = _guard_near_the_hard_samples(90)
    retain = TuneSet(torch.cat([near.images, easy.images]), torch.cat([near.labels, easy.labels]))
    drifted = copy.deepcopy(model)  # three unguarded steps of an earlier request moved the boundary past the guard
    forget_finetune(drifted, hard, easy, None, TuneConfig(lr=0.3, max_steps=3, tolerance=0.0, optimizer="sgd",
                                                          noise_std=0.0, easy_weight=0.0, margin=8.0,
                                                          retain_weight=0.0), DEVICE)
    start = _guard_accuracy(drifted, guard)
    assert start < 100.0
    cfg = TuneConfig(lr=0.03, max_steps=100, min_steps=1, optimizer="sgd", noise_std=0.0, easy_weight=0.0,
                     margin=8.0, retain_weight=1.0, retain_loss="ce", retain_batch=64, guard_drop=0.0,
                     guard_mode="repair", guard_repairs=40)
    own = forget_finetune(copy.deepcopy(drifted), hard, easy, retain, cfg, DEVICE, guard=guard)
    assert own.guard_level == own.guard_accuracy_before == start
    restored = copy.deepcopy(drifted)
    result = forget_finetune(restored, hard, easy, retain, cfg, DEVICE, guard=guard, guard_level=100.0)
    assert result.guard_level == 100.0 and result.guard_accuracy_before == start and result.refused_steps >= 1
    assert result.guard_accuracy_after == _guard_accuracy(restored, guard) == 100.0
    assert result.stop_reason == "aligned" and result.hard_accuracy_after == 0.0
    halve = TuneConfig(**{**cfg.__dict__, "guard_mode": "halve"})
    assert forget_finetune(copy.deepcopy(drifted), hard, easy, retain, halve, DEVICE, guard=guard,
                           guard_level=100.0).guard_level == start  # "halve" compares with the start only


def test_consolidation_steps_run_only_after_the_run_is_aligned_and_keep_the_request_forgotten():
    """After the run is aligned, ``consolidate_steps`` more steps, which leave the hard samples misclassified and
    the easy ones correct (what they do for the test accuracy is measured in BENCHMARKS.md, on CIFAR-10)."""
    model, hard, easy = _two_blob_model()
    anchor = copy.deepcopy(model).eval()
    near = _guard_near_the_hard_samples(90)
    far = _guard_near_the_hard_samples(200)
    retain = TuneSet(torch.cat([near.images, far.images]), torch.cat([near.labels, torch.ones_like(far.labels)]))
    with torch.no_grad():
        high = logit_margin(model(easy.images.float() / 255), easy.labels) + 5.0  # the easy term stays quiet
    easy = TuneSet(easy.images, easy.labels, high)
    cfg = TuneConfig(lr=0.05, max_steps=60, optimizer="sgd", noise_std=0.0, margin=1.0, retain_weight=1.0,
                     retain_loss="kl", retain_batch=64)
    plain = copy.deepcopy(model)
    first = forget_finetune(plain, hard, easy, retain, cfg, DEVICE, anchor=anchor)
    assert first.stop_reason == "aligned" and first.consolidated_steps == 0
    consolidated = copy.deepcopy(model)
    result = forget_finetune(consolidated, hard, easy, retain, TuneConfig(**{**cfg.__dict__, "consolidate_steps": 40}),
                             DEVICE, anchor=anchor)
    assert result.stop_reason == "aligned" and result.steps == first.steps and result.consolidated_steps == 40
    assert result.hard_accuracy_after == 0.0 and result.easy_accuracy_after == 100.0
    assert not all(torch.equal(a, b) for a, b in zip(consolidated.state_dict().values(),
                                                     plain.state_dict().values()))  # the extra steps moved it


def test_a_request_aligned_before_its_first_step_is_not_consolidated_and_leaves_the_model_as_it_was():
    """No sample predicted hard and every easy margin already at its target: the run is aligned at step 0, took no
    forget step, so there is nothing to repair, and the consolidation steps would only move the model (here the
    optimiser's weight decay alone would)."""
    model, hard, easy = _two_blob_model()
    anchor = copy.deepcopy(model).eval()
    with torch.no_grad():
        high = logit_margin(model(easy.images.float() / 255), easy.labels) + 5.0
    easy = TuneSet(easy.images, easy.labels, high)
    none_hard = TuneSet(hard.images[:0], hard.labels[:0])
    cfg = TuneConfig(lr=0.05, max_steps=60, optimizer="sgd", noise_std=0.0, retain_weight=1.0, retain_loss="kl",
                     consolidate_steps=40, easy_slack=0.25)
    untouched = copy.deepcopy(model)
    result = forget_finetune(untouched, none_hard, easy, TuneSet(easy.images, easy.labels), cfg, DEVICE,
                             anchor=anchor)
    assert result.stop_reason == "aligned" and result.steps == 0 and result.consolidated_steps == 0
    assert result.easy_accuracy_after == 100.0
    assert all(torch.equal(a, b) for a, b in zip(untouched.state_dict().values(), model.state_dict().values()))


def test_consolidation_that_drags_easy_samples_across_the_boundary_is_followed_by_steps_that_realign_the_run():
    """Easy class-0 samples right beside the hard ones: the consolidation steps' hinge on the hard samples takes
    the easy ones across the boundary too, and two-sided steps bring them back; where no step can (a target the
    boundary between them does not allow), they stop after ``consolidate_steps``."""
    model, hard, _ = _two_blob_model()
    gen = generator(5)
    beside = (torch.full((6, 3, 2, 2), 105.0) + torch.randn((6, 3, 2, 2), generator=gen) * 4).clamp(0, 255)
    labels = torch.zeros(6, dtype=torch.long)
    cfg = TuneConfig(lr=0.05, max_steps=100, optimizer="sgd", noise_std=0.0, margin=4.0, retain_weight=0.0,
                     consolidate_steps=30, tolerance=0.0)
    easy = TuneSet(beside.to(torch.uint8), labels, torch.zeros(6))
    result = forget_finetune(copy.deepcopy(model), hard, easy, None, cfg, DEVICE)
    assert result.stop_reason == "aligned" and result.consolidated_steps == 30 and result.realigned_steps > 0
    assert result.hard_accuracy_after == 0.0 and result.easy_accuracy_after == 100.0
    left = forget_finetune(copy.deepcopy(model), hard, easy, None, TuneConfig(**{**cfg.__dict__, "realign": False}),
                           DEVICE)
    assert left.stop_reason == "aligned" and left.realigned_steps == 0 and left.easy_accuracy_after < 100.0
    bound = forget_finetune(copy.deepcopy(model), hard, TuneSet(easy.images, labels, torch.full((6,), 0.5)), None,
                            TuneConfig(**{**cfg.__dict__, "lr": 0.1}), DEVICE)
    assert bound.stop_reason == "aligned" and bound.realigned_steps == 30 and bound.easy_accuracy_after < 100.0


def test_the_held_out_anchor_keeps_the_model_s_outputs_on_held_out_images_where_the_reference_had_them():
    """Forgetting the hard samples moves the boundary past the held-out class-0 images beside them (the fault: the
    accuracy a stream of requests loses on images nobody trained on); with ``held_out_weight`` the KL term towards
    the reference logits on those images keeps them, and the request still ends aligned."""
    model, hard, easy = _two_blob_model()
    held = _guard_near_the_hard_samples(100)
    with torch.no_grad():
        reference = model(held.images.float() / 255)
    held = TuneSet(held.images, held.labels, reference_logits=reference)
    cfg = TuneConfig(lr=0.1, max_steps=60, min_steps=40, optimizer="sgd", retain_weight=0.0, noise_std=0.0,
                     easy_weight=0.0, margin=8.0)
    loose = copy.deepcopy(model)
    result = forget_finetune(loose, hard, easy, None, cfg, DEVICE, held_out=held)  # weight 0: the set is not used
    assert result.hard_accuracy_after == 0.0 and _guard_accuracy(loose, held) < 50.0
    anchored = copy.deepcopy(model)
    result = forget_finetune(anchored, hard, easy, None, TuneConfig(**{**cfg.__dict__, "held_out_weight": 1.0}),
                             DEVICE, held_out=held)
    assert result.stop_reason == "aligned" and result.hard_accuracy_after == 0.0
    assert _guard_accuracy(anchored, held) == 100.0
    with pytest.raises(InvalidInputError, match="reference logits, one row an image"):
        forget_finetune(model, hard, easy, None, cfg, DEVICE, held_out=TuneSet(held.images, held.labels))


def test_forget_scale_pushes_the_hard_samples_of_a_request_above_it_harder_and_leaves_smaller_ones_as_they_were():
    """A held-out anchor strong enough to hold the hard samples where they are (the fault: a large request whose
    batch-mean hard term loses to the fixed anchor and runs out of steps); with ``forget_scale`` below the
    request's size the hard term weighs with it and the run ends aligned, the anchor's images still right. A
    request no larger than ``forget_scale`` is tuned exactly as without it."""
    model, hard, easy = _two_blob_model()  # a request of 3 hard and 6 easy samples
    held = _guard_near_the_hard_samples(100)
    with torch.no_grad():
        held = TuneSet(held.images, held.labels, reference_logits=model(held.images.float() / 255))
    cfg = TuneConfig(lr=0.003, max_steps=40, optimizer="adam", retain_weight=0.0, noise_std=0.0, easy_weight=0.0,
                     held_out_weight=30.0)
    runs = {}
    for scale in (None, 9, 3):
        runs[scale] = copy.deepcopy(model)
        result = forget_finetune(runs[scale], hard, easy, None, TuneConfig(**{**cfg.__dict__, "forget_scale": scale}),
                                 DEVICE, held_out=held)
        if scale == 3:  # 9 samples above 3: the hard term weighs 3 times
            assert result.stop_reason == "aligned" and result.hard_accuracy_after == 0.0
            assert result.easy_accuracy_after == _guard_accuracy(runs[scale], held) == 100.0
        else:
            assert result.stop_reason == "max_steps" and result.hard_accuracy_after == 100.0
    assert all(torch.equal(a, b) for a, b in zip(runs[None].state_dict().values(), runs[9].state_dict().values()))
    with pytest.raises(InvalidInputError, match="forget_scale"):
        TuneConfig(forget_scale=0)


def test_the_one_sided_easy_term_pulls_down_margins_above_the_target_and_back_across_the_boundary_only():
    logits = torch.tensor([[5.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # margins 5, 1 and -2 for label 0
    part = TuneSet(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long),
                   torch.full((3,), 3.0))
    assert easy_loss(logits, part, DEVICE).item() == pytest.approx((2 + 2 + 5) / 3)
    assert easy_loss(logits, part, DEVICE, one_sided=True).item() == pytest.approx((2 + 0 + 2) / 3)


def test_a_run_that_is_not_aligned_is_not_consolidated():
    model, hard, easy = _two_blob_model()
    result = forget_finetune(model, hard, easy, None, TuneConfig(lr=1e-8, max_steps=3, tolerance=0.0,
                                                                 consolidate_steps=10), DEVICE)
    assert result.stop_reason == "max_steps" and result.consolidated_steps == 0


def test_warmup_raises_the_rate_linearly_to_lr():
    cfg = TuneConfig(lr=0.01, warmup_steps=4)
    assert [cfg.rate(k) for k in range(6)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert TuneConfig(lr=0.01).rate(0) == 0.01
    model, hard, easy = _two_blob_model()
    slow = forget_finetune(copy.deepcopy(model), hard, easy, None,
                           TuneConfig(lr=0.05, max_steps=200, optimizer="sgd", retain_weight=0.0, warmup_steps=50),
                           DEVICE)
    fast = forget_finetune(model, hard, easy, None,
                           TuneConfig(lr=0.05, max_steps=200, optimizer="sgd", retain_weight=0.0), DEVICE)
    assert slow.stop_reason == fast.stop_reason == "aligned" and slow.steps > fast.steps


def test_guard_settings_are_checked():
    with pytest.raises(InvalidInputError, match="guard_drop"):
        TuneConfig(guard_drop=-1.0)
    with pytest.raises(InvalidInputError, match="guard_size"):
        get_method("tmu", guard_size=0)
    with pytest.raises(InvalidInputError, match="guard_max_samples"):
        get_method("tmu", guard_max_samples=0)
    with pytest.raises(InvalidInputError, match="guard_mode"):
        TuneConfig(guard_mode="undo")
    with pytest.raises(InvalidInputError, match="warmup_steps"):
        TuneConfig(warmup_steps=-1)
