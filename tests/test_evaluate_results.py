"""Averaging per-class rows into mean rows, and the fixed-width table line."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tmu_core.evaluate.report import format_row
from tmu_core.evaluate.results import MethodResult, mean_rows


def _row(method: str, forget_class: int, acc_df: float, delta: float, acc_gl: float | None) -> MethodResult:
    return MethodResult(method=method, kind="method", forget_class=forget_class, class_name=f"c{forget_class}",
                        seed=0, acc_dtest=80.0 + forget_class, acc_df=acc_df, delta=delta, ad=0.1 * forget_class,
                        asr=40.0, gold_asr=30.0, acc_dr=99.0, acc_gl=acc_gl, seconds=2.0 * forget_class,
                        prepare_seconds=None)


def test_mean_rows_average_each_label_over_forget_sets_in_first_seen_order():
    rows = [_row("tmu", 1, 90.0, 4.0, 80.0), _row("finetune", 1, 100.0, 14.0, None),
            _row("tmu", 3, 70.0, 2.0, 60.0), _row("finetune", 3, 100.0, 30.0, None)]
    means = mean_rows(rows)
    assert [m.method for m in means] == ["tmu", "finetune"]
    tmu, finetune = means
    assert tmu.acc_df == pytest.approx(80.0) and tmu.delta == pytest.approx(3.0)
    assert tmu.acc_gl == pytest.approx(70.0) and finetune.acc_gl is None
    assert tmu.ad == pytest.approx(0.2) and tmu.seconds == pytest.approx(4.0)
    assert tmu.runs == 2 and tmu.forget_class is None and tmu.seed is None and tmu.class_name == "mean"
    assert tmu.prepare_seconds is None


def test_mean_of_deltas_is_not_the_delta_of_means():
    # Per-class gaps of opposite sign must not cancel out: Delta is averaged, not recomputed.
    rows = [_row("neg_grad", 1, 50.0, 40.0, None), _row("neg_grad", 3, 90.0, 40.0, None)]
    assert mean_rows(rows)[0].delta == pytest.approx(40.0)


def test_format_row_shows_a_dash_for_missing_values():
    line = format_row(_row("finetune", 1, 100.0, 14.0, None))
    assert line.startswith("finetune ")
    assert "100.0" in line and "14.0" in line
    assert line.split()[-2:] == ["2.0", "-"]


def test_nan_outputs_are_flagged_and_written_as_json_null(tmp_path):
    import json

    import torch

    from tmu_core.evaluate.report import write_json
    from tmu_core.evaluate.results import ProtocolResult, SplitSummary
    from tmu_core.evaluate.scoring import EvalTensors, Outputs, make_forget_set, score

    tensors = EvalTensors(("a", "b", "c"), ("x", "y"), torch.tensor([0, 1, 0]), torch.tensor([1, 0]))
    forget_set = make_forget_set(tensors, seed=0, forget_class=0, class_name="c0", forget_ids=("a",))
    assert forget_set.retain_ids == ("b", "c")
    outputs = Outputs(torch.full((3, 2), float("nan")), torch.zeros(2, 2))
    scores = score(outputs, tensors, forget_set, alpha=0.5)
    assert scores.details["non_finite_outputs"] == 3
    row = replace(_row("tmu", 0, 0.0, 1.0, None), ad=float("nan"))
    result = ProtocolResult(protocol={"name": "t"}, device="cpu", splits=SplitSummary(3, 0, 2, 1), originals=(),
                            rows=(row,), means=mean_rows([row]), wall_seconds=1.0)
    write_json(result, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rows"][0]["ad"] is None and data["means"][0]["ad"] is None
