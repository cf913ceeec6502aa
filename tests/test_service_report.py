"""The job report: metrics of two models on D_f and D_test, report.json, report.png and the text table."""

from __future__ import annotations

import json

import torch

from tmu_core.forget.drift import paired_se, right_mask
from tmu_core.forget.report import format_report, measure, metrics_dict, ordered_timings, write_report
from tmu_core.models import build_model
from tmu_core.train import predict_logits


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", 4, 3, 8).eval()


def test_measure_and_write(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    forget = (torch.randint(0, 256, (6, 3, 8, 8), generator=gen, dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 0, 1]))
    test = (torch.randint(0, 256, (10, 3, 8, 8), generator=gen, dtype=torch.uint8), torch.arange(10) % 4)
    before, after = _model(0), _model(1)
    metrics = measure(before, after, forget, test, torch.device("cpu"), hard=2)
    assert metrics.forget_size == 6 and metrics.test_size == 10
    assert (metrics.predicted_hard, metrics.predicted_easy) == (2, 4)
    values = [metrics.acc_test_before, metrics.acc_forget_after, metrics.asr_before, metrics.asr_after]
    assert all(0.0 <= v <= 100.0 for v in values)
    same = measure(before, before, forget, test, torch.device("cpu"), hard=None)
    assert same.acc_forget_before == same.acc_forget_after and same.predicted_easy is None
    # which test images each model got right, for the drift record's paired error; not in the report
    right = predict_logits(after, test[0], torch.device("cpu")).argmax(1) == test[1]
    assert metrics.test_right_after == right_mask(right) and same.test_right_before == same.test_right_after
    assert paired_se(metrics.test_right_before, metrics.test_right_after, 10) is not None

    report = {"job_id": "fj-1", "model": "m", "from_version": 1, "to_version": 2, "method": "tmu",
              "metrics": metrics_dict(metrics), "timings": {"register": 3.0, "load": 1.0, "request_to_serving": 9.0}}
    assert not any(key.startswith("test_right") for key in report["metrics"])
    json_path, png_path = write_report(tmp_path, report)
    assert json.loads(json_path.read_text())["metrics"]["forget_size"] == 6
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_report(report)
    assert "v1 -> v2" in text and "ACC_Df" in text and "predicted hard/easy: 2/4" in text
    assert text.index("load 1.00") < text.index("register 3.00") < text.index("request_to_serving 9.00")


def test_ordered_timings_puts_unknown_last() -> None:
    assert [k for k, _ in ordered_timings({"zz": 1, "drain": 1, "queue_wait": 1})] == ["queue_wait", "drain", "zz"]
