"""The per-example LiRA test: the statistic, the complementary shadow halves, the score, the options, one real run."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from tmu_core.cli import cli
from tmu_core.cli import evaluate_cmd  # noqa: F401  attaches the evaluate command
from tmu_core.errors import InvalidInputError
from tmu_core.evaluate import MethodSpec, builtin_protocol, customize, format_table, run_protocol, run_sequential
from tmu_core.evaluate.harness import _steps
from tmu_core.evaluate.lira import (
    fit_shadow_stats,
    half_seed,
    likelihood_ratio,
    logit_confidence,
    membership_test,
    shadow_membership,
    shadow_seeds,
)
from tmu_core.evaluate.report import format_row
from tmu_core.evaluate.results import MethodResult, mean_rows
from tmu_core.train import load_checkpoint

CPU = torch.device("cpu")


# --- the statistic -------------------------------------------------------------------------------------------------

def test_logit_confidence_is_the_log_odds_of_the_true_label_and_stays_finite():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    labels = torch.tensor([0, 2, 1])
    probs = torch.softmax(logits.double(), dim=1)[torch.arange(3), labels]
    expected = torch.log(probs / (1 - probs)).float()
    torch.testing.assert_close(logit_confidence(logits, labels), expected)
    # p_y rounds to 1 in float32 here; the log odds are still exact: 120 - logsumexp(0, 0).
    saturated = logit_confidence(torch.tensor([[120.0, 0.0, 0.0]]), torch.tensor([0]))
    assert saturated.item() == pytest.approx(120.0 - math.log(2.0))
    with pytest.raises(InvalidInputError, match="at least 2 classes"):
        logit_confidence(torch.zeros(2, 1), torch.tensor([0, 0]))
    with pytest.raises(InvalidInputError, match="labels must be"):
        logit_confidence(torch.zeros(2, 3), torch.tensor([0]))


# --- complementary halves ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("population", "shadows"), [(10, 4), (101, 8), (37, 6)])
def test_every_sample_is_in_for_exactly_half_of_the_shadows(population, shadows):
    membership = shadow_membership(population, shadows, seed=3)
    assert membership.shape == (shadows, population) and membership.dtype == torch.bool
    assert membership.sum(dim=0).tolist() == [shadows // 2] * population
    for pair in range(shadows // 2):
        first, second = membership[2 * pair], membership[2 * pair + 1]
        assert torch.equal(first, ~second)  # a pair splits the population in two
        assert int(first.sum()) == population // 2
    assert len({tuple(row.tolist()) for row in membership[::2]}) == shadows // 2  # pairs draw different halves


def test_halves_and_training_seeds_follow_the_protocol_seed():
    assert torch.equal(shadow_membership(50, 4, seed=0), shadow_membership(50, 4, seed=0))
    assert not torch.equal(shadow_membership(50, 4, seed=0), shadow_membership(50, 4, seed=1))
    assert (half_seed(0, 0), half_seed(0, 1), half_seed(3, 1)) == (10000, 20000, 20003)
    assert shadow_seeds(2, 4) == (10002, 10003, 20002, 20003)


@pytest.mark.parametrize("shadows", [2, 3, 5, 0, -4, 4.0, True, "8"])
def test_a_shadow_count_that_makes_no_pairs_is_refused(shadows):
    with pytest.raises(InvalidInputError, match=r"lira_shadows must be an even integer >= 4 .*got"):
        shadow_membership(20, shadows, seed=0)


# --- fit and score on synthetic shadows ----------------------------------------------------------------------------

def _synthetic(population: int = 400, shadows: int = 8, shift: float = 3.0):
    """Shadows whose phi is each sample's own level, ``shift`` higher when the shadow trained on it, plus noise."""
    g = torch.Generator().manual_seed(1)
    membership = shadow_membership(population, shadows, seed=0)
    level = 2.0 * torch.randn(population, generator=g)  # easy and hard samples
    phi = level + shift * membership.float() + 0.5 * torch.randn(shadows, population, generator=g)
    return level, membership, phi


def _model_phi(level: torch.Tensor, saw: torch.Tensor, shift: float = 3.0) -> torch.Tensor:
    noise = 0.5 * torch.randn(level.shape, generator=torch.Generator().manual_seed(2))
    return level + shift * saw.float() + noise


def test_a_member_like_model_scores_near_1_and_an_out_like_one_near_half():
    level, membership, phi = _synthetic()
    stats = fit_shadow_stats(phi, membership)
    members = torch.arange(400) < 200  # the first half plays D_f, the rest the non-members
    saw_members = _model_phi(level, members)  # trained on D_f
    never = _model_phi(level, torch.zeros(400, dtype=torch.bool))  # as if retrained without it
    member_like = likelihood_ratio(saw_members, stats)
    out_like = likelihood_ratio(never, stats)
    high = membership_test(member_like[:200], member_like[200:])
    chance = membership_test(out_like[:200], out_like[200:])
    assert high.auc > 0.97 and high.tpr5 > 50.0
    assert 0.4 < chance.auc < 0.6 and chance.tpr1 < 10.0
    assert (high.members, high.nonmembers) == (200, 200)
    # Per-sample calibration is the point: the raw statistic ranks easy non-members above hard members.
    raw = membership_test(saw_members[:200], saw_members[200:])
    assert raw.auc < high.auc - 0.05


def test_variance_is_shared_below_64_shadows_and_per_sample_from_64():
    _, membership, phi = _synthetic(shadows=8)
    fixed = fit_shadow_stats(phi, membership)
    assert not fixed.per_example_variance and fixed.shadows == 8
    assert torch.all(fixed.var_in == fixed.var_in[0]) and fixed.var_in[0].item() == pytest.approx(0.25, rel=0.2)
    torch.testing.assert_close(fixed.mean_in - fixed.mean_out, torch.full((400,), 3.0), atol=1.5, rtol=0)
    _, membership, phi = _synthetic(population=50, shadows=64)
    per_sample = fit_shadow_stats(phi, membership)
    assert per_sample.per_example_variance and len(set(per_sample.var_out.tolist())) > 1
    assert fit_shadow_stats(phi, membership, per_example_variance=False).var_out.unique().numel() == 1
    subset = per_sample.select(torch.tensor([4, 1]))
    assert subset.mean_in.tolist() == [per_sample.mean_in[4].item(), per_sample.mean_in[1].item()]


def test_fit_and_score_refuse_mismatched_inputs():
    _, membership, phi = _synthetic(population=20, shadows=4)
    with pytest.raises(InvalidInputError, match="same \\(S, P\\) shape"):
        fit_shadow_stats(phi[:, :10], membership)
    lonely = membership.clone()
    lonely[:, 0] = torch.tensor([True, False, False, False])
    with pytest.raises(InvalidInputError, match="at least 2 IN and 2 OUT shadows, but one has 1"):
        fit_shadow_stats(phi, lonely)
    with pytest.raises(InvalidInputError, match="expected phi of shape \\(20,\\)"):
        likelihood_ratio(torch.zeros(3), fit_shadow_stats(phi, membership))


def test_tpr_is_the_best_rate_whose_false_positive_rate_reaches_the_target():
    nonmembers = torch.arange(100, dtype=torch.float32)  # FPR moves in steps of 1%
    one_above = membership_test(torch.full((10,), 98.5), nonmembers)  # above all but one non-member
    assert (one_above.tpr1, one_above.tpr5) == (100.0, 100.0)
    two_above = membership_test(torch.full((10,), 97.5), nonmembers)  # needs a 2% FPR
    assert (two_above.tpr1, two_above.tpr5) == (0.0, 100.0)
    separated = membership_test(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0]))
    reversed_ = membership_test(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0]))
    assert (separated.auc, reversed_.auc, reversed_.tpr5) == (1.0, 0.0, 0.0)
    broken = membership_test(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0]))
    assert math.isnan(broken.auc) and math.isnan(broken.tpr1)
    with pytest.raises(InvalidInputError, match="member_scores must be a non-empty 1-D tensor"):
        membership_test(torch.zeros(0), torch.zeros(3))


# --- options -------------------------------------------------------------------------------------------------------

def test_protocol_and_customize_check_the_membership_test():
    base = builtin_protocol("digits-tiny")
    assert (base.mia, base.lira_shadows) == ("population", 8)
    with pytest.raises(InvalidInputError, match="unknown membership test mia='shadow'; accepted: population, lira"):
        replace(base, mia="shadow")
    with pytest.raises(InvalidInputError, match="lira_shadows must be an even integer >= 4.*got 5"):
        customize(base, mia="lira", lira_shadows=5)
    with pytest.raises(InvalidInputError, match="--lira-shadows applies to --mia lira, not to population"):
        customize(base, lira_shadows=6)
    protocol = customize(base, mia="lira", lira_shadows=6)
    assert (protocol.mia, protocol.lira_shadows) == ("lira", 6)
    assert customize(protocol, lira_shadows=4).lira_shadows == 4  # the protocol's own test takes a count
    assert protocol.to_dict()["mia"] == "lira"
    # The progress bar counts the shadows: 1 original + 6 shadows + 3 prepares + (gold, floor, 3 methods).
    assert _steps(protocol) == 1 + 6 + 3 + 5 and _steps(base) == 1 + 3 + 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mia", "lira", "--lira-shadows", "5"], "lira_shadows must be an even integer >= 4"),
        (["--mia", "lira", "--lira-shadows", "2"], "got 2"),
        (["--lira-shadows", "8"], "--lira-shadows applies to --mia lira, not to population (--mia)"),
        (["--mia", "shadow"], "Invalid value for '--mia': 'shadow' is not one of 'population', 'lira'"),
        (["--mia", "lira", "--lira-shadows", "x"], "'x' is not a valid integer"),
    ],
)
def test_cli_rejects_bad_membership_options(args, message, tmp_path):
    outcome = CliRunner().invoke(cli, ["evaluate", "--protocol", "digits-tiny", "--out", str(tmp_path),
                                       "--cache-dir", str(tmp_path / "cache"), "--no-progress", *args])
    assert outcome.exit_code != 0
    assert message in outcome.output


# --- rows and table ------------------------------------------------------------------------------------------------

def _row(method: str, auc: float | None, gap: float | None) -> MethodResult:
    return MethodResult(method=method, kind="method", forget_class=1, class_name="c1", seed=0, acc_dtest=80.0,
                        acc_df=90.0, delta=1.0, ad=0.1, asr=40.0, gold_asr=30.0, acc_dr=99.0, acc_gl=None,
                        seconds=2.0, lira_auc=auc, lira_tpr1=None if auc is None else 2.0,
                        lira_tpr5=None if auc is None else 10.0, lira_gap=gap)


def test_mean_rows_average_lira_numbers_and_keep_none_without_them():
    means = mean_rows([_row("tmu", 0.6, 0.1), _row("tmu", 0.8, 0.05), _row("finetune", None, None)])
    tmu, finetune = means
    assert tmu.lira_auc == pytest.approx(0.7) and tmu.lira_gap == pytest.approx(0.075)
    assert tmu.lira_tpr1 == pytest.approx(2.0) and tmu.lira_tpr5 == pytest.approx(10.0)
    assert finetune.lira_auc is None and finetune.lira_gap is None


def test_format_row_adds_the_lira_columns_only_when_asked():
    assert format_row(_row("tmu", 0.61234, 0.0421)) == format_row(_row("tmu", None, None))
    assert format_row(_row("tmu", 0.61234, 0.0421), lira=True).split()[-2:] == ["0.612", "0.042"]
    assert format_row(_row("tmu", None, None), lira=True).split()[-2:] == ["-", "-"]


# --- one real run on the digits ------------------------------------------------------------------------------------

def _lira_protocol():
    """What the CLI builds from --methods neg_grad --epochs 4 --forget-size 15 --mia lira --lira-shadows 4."""
    return customize(builtin_protocol("digits-tiny"), methods=["neg_grad"], epochs=4, forget_size=15, mia="lira",
                     lira_shadows=4)


@pytest.fixture(scope="module")
def lira_run(tmp_path_factory):
    """One LiRA run: (result, output folder, cache folder)."""
    out, cache_dir = tmp_path_factory.mktemp("lira-out"), tmp_path_factory.mktemp("lira-cache")
    return run_protocol(_lira_protocol(), out, CPU, cache_dir=cache_dir, progress=False), out, cache_dir


def test_every_row_carries_a_lira_auc_and_its_gap_to_the_gold(lira_run):
    result, _, _ = lira_run
    assert [row.method for row in result.rows] == ["original", "gold", "gold-floor", "neg_grad"]
    gold = next(row for row in result.rows if row.kind == "gold")
    for row in (*result.rows, *result.means):
        assert 0.0 <= row.lira_auc <= 1.0 and math.isfinite(row.lira_auc)
        assert 0.0 <= row.lira_tpr1 <= row.lira_tpr5 <= 100.0
        assert row.lira_gap == pytest.approx(abs(row.lira_auc - gold.lira_auc))
    assert gold.lira_gap == 0.0
    shadows = result.originals[0].shadows
    assert (shadows.count, shadows.cached, shadows.per_example_variance) == (4, 0, False)


def test_shadows_train_on_halves_of_the_training_set_and_eval_split(lira_run):
    result, _, cache_dir = lira_run
    population = result.splits.train + result.splits.eval
    sides = {path.stem: json.loads(path.read_text()) for path in (cache_dir / "models").glob("*.json")}
    shadows = sorted(key for key, side in sides.items() if side["role"] == "shadow")
    assert sorted(sides[key]["seed"] for key in shadows) == list(shadow_seeds(0, 4))
    metas = [load_checkpoint(cache_dir / "models" / f"{key}.pt", CPU)[1] for key in shadows]
    assert sorted(meta.train_size for meta in metas) == [population // 2] * 2 + [population - population // 2] * 2


def test_the_table_json_and_csv_carry_lira(lira_run):
    result, out, _ = lira_run
    table = format_table(result)
    assert "LiRA LiRAgap" in table and "LiRA shadows seed 0: 4 trained in" in table
    data = json.loads((out / "results.json").read_text())
    assert data["protocol"]["mia"] == "lira" and data["protocol"]["lira_shadows"] == 4
    assert data["rows"][0]["lira_auc"] == pytest.approx(result.rows[0].lira_auc)
    assert data["originals"][0]["shadows"]["count"] == 4
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.endswith("lira_auc,lira_tpr1,lira_tpr5,lira_gap,acc_wide")


def test_a_rerun_through_the_cli_reads_the_shadows_from_the_cache(lira_run, tmp_path, caplog):
    result, _, cache_dir = lira_run
    args = ["evaluate", "--protocol", "digits-tiny", "--methods", "neg_grad", "--epochs", "4", "--forget-size", "15",
            "--mia", "lira", "--lira-shadows", "4", "--out", str(tmp_path), "--cache-dir", str(cache_dir),
            "--device", "cpu", "--no-progress"]
    with caplog.at_level("INFO", logger="tmu_core.evaluate.cache"):
        outcome = CliRunner().invoke(cli, args)
    assert outcome.exit_code == 0, outcome.output
    assert "LiRA LiRAgap" in outcome.output and "LiRA shadows seed 0: 4 trained in" in outcome.output
    assert "(4 cached)" in outcome.output
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if m.startswith("training ")]  # nothing trained again, shadows included
    assert sum(m.startswith("cached shadow model") for m in messages) == 4
    again = json.loads((tmp_path / "results.json").read_text())
    assert [row["lira_auc"] for row in again["rows"]] == pytest.approx([row.lira_auc for row in result.rows])


def test_sequential_requests_score_the_union_with_the_seeds_shadows(lira_run, tmp_path):
    _, _, cache_dir = lira_run
    protocol = replace(_lira_protocol(), forget_shape="owner", owners=2,
                       methods=(MethodSpec("finetune", "finetune", {"epochs": 1}),))
    result = run_sequential(protocol, 2, tmp_path, CPU, cache_dir=cache_dir, progress=False)
    assert result.originals[0].cached and result.originals[0].shadows.cached == 4  # the class run's shadows
    assert {row.method for row in result.rows} == {"original", "gold", "gold-floor", "finetune"}
    for row in result.rows:
        assert 0.0 <= row.lira_auc <= 1.0
    golds = [row for row in result.rows if row.kind == "gold"]
    assert [row.lira_gap for row in golds] == [0.0, 0.0]
    assert "LiRA LiRAgap" in (tmp_path / "results.txt").read_text()
