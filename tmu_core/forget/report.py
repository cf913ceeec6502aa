"""What a forget job measured, as ``report.json`` and a small ``report.png`` beside the new version."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
# Timings in the order things happen; "request_to_serving" spans queue_wait .. set_default.
TIMING_ORDER = ("queue_wait", "worker_start", "prepare_artifacts", "load", "unlearn", "evaluate", "save", "package",
                "register", "commit", "set_default", "drain", "unregister_old", "request_to_serving")


def seconds_since(iso_time: str) -> float:
    """Wall-clock seconds from an ISO 8601 time until now."""
    from datetime import datetime, timezone

    return (datetime.now(timezone.utc) - datetime.fromisoformat(iso_time)).total_seconds()


def ordered_timings(timings: dict[str, float]) -> list[tuple[str, float]]:
    """``timings`` as (name, seconds) pairs in pipeline order, unknown names last."""
    rank = {name: n for n, name in enumerate(TIMING_ORDER)}
    return sorted(timings.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


@dataclass(frozen=True)
class ForgetMetrics:
    """Accuracies (percent) and membership-attack success rates (percent) before and after unlearning.

    Attributes:
        acc_test_before / acc_test_after: ACC on D_test (the eval half of the test split).
        acc_forget_before / acc_forget_after: ACC on D_f.
        asr_before / asr_after: loss-threshold attack success on D_f, calibrated on D_test (lower is better;
            about ``alpha`` x 100 means D_f looks like unseen data).
        forget_size / test_size: |D_f| and |D_test|.
        predicted_hard / predicted_easy: the method's easy/hard split of D_f (None if it makes none).
        test_right_before / test_right_after: which images of D_test each model got right
            (:func:`tmu_core.forget.drift.right_mask`), for the drift record's paired error; not in reports.
    """

    acc_test_before: float
    acc_test_after: float
    acc_forget_before: float
    acc_forget_after: float
    asr_before: float
    asr_after: float
    forget_size: int
    test_size: int
    predicted_hard: int | None
    predicted_easy: int | None
    test_right_before: str = ""
    test_right_after: str = ""


def _scores(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
            device: torch.device) -> tuple[float, torch.Tensor, str]:
    from tmu_core.evaluate.metrics import accuracy, sample_losses
    from tmu_core.forget.drift import right_of
    from tmu_core.train import predict_logits

    logits = predict_logits(model, images, device)
    return accuracy(logits, labels), sample_losses(logits, labels), right_of(logits, labels)


def measure(before: torch.nn.Module, after: torch.nn.Module, forget: tuple[torch.Tensor, torch.Tensor],
            test: tuple[torch.Tensor, torch.Tensor], device: torch.device, hard: int | None,
            alpha: float = 0.5) -> ForgetMetrics:
    """Score both models on D_f and D_test and run the membership attack on D_f.

    Args:
        before / after: the served model and the unlearned one.
        forget / test: uint8 images (N, C, H, W) and labels (N,) of D_f and D_test.
        device: where to run the models.
        hard: how many forget samples the method predicted hard (None if it does not predict).
        alpha: the attack's false-positive rate on non-members.
    """
    from tmu_core.evaluate.metrics import loss_threshold_attack

    acc = {}
    for name, model in (("before", before), ("after", after)):
        acc_f, loss_f, _ = _scores(model, *forget, device)
        acc_t, loss_t, right_t = _scores(model, *test, device)
        acc[name] = (acc_t, acc_f, loss_threshold_attack(loss_f, loss_t, alpha).success_rate, right_t)
    size = int(forget[1].numel())
    return ForgetMetrics(acc_test_before=acc["before"][0], acc_test_after=acc["after"][0],
                         acc_forget_before=acc["before"][1], acc_forget_after=acc["after"][1],
                         asr_before=acc["before"][2], asr_after=acc["after"][2], forget_size=size,
                         test_size=int(test[1].numel()), predicted_hard=hard,
                         predicted_easy=None if hard is None else size - hard,
                         test_right_before=acc["before"][3], test_right_after=acc["after"][3])


def write_report(folder: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.png`` into ``folder``.

    Args:
        folder: the new version's folder.
        report: JSON-ready dict with at least ``metrics`` (a :class:`ForgetMetrics` as dict) and ``timings``.

    Returns:
        The two paths.
    """
    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = folder / REPORT_JSON, folder / REPORT_PNG
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    _plot(report, png_path)
    return json_path, png_path


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, timings = report["metrics"], report.get("timings", {})
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    exact = report.get("kind") == "retrain"
    names = ["ACC D_test"] if exact else ["ACC D_test", "ACC D_f", "ASR D_f"]
    before = [metrics["acc_test_before"]] + ([] if exact else [metrics["acc_forget_before"], metrics["asr_before"]])
    after = [metrics["acc_test_after"]] + ([] if exact else [metrics["acc_forget_after"], metrics["asr_after"]])
    xs = range(len(names))
    left.bar([x - 0.2 for x in xs], before, width=0.4, label=f"v{report.get('from_version')}")
    left.bar([x + 0.2 for x in xs], after, width=0.4, label=f"v{report.get('to_version')}")
    left.set_xticks(list(xs), names)
    left.set_ylim(0, 100)
    left.set_ylabel("%")
    left.legend(fontsize=8)
    left.set_title(f"{report.get('model')}: " + (f"exact retrain on {metrics['trained_on']} samples" if exact
                                                  else f"forget {metrics['forget_size']} samples"), fontsize=9)
    steps = [(k, v) for k, v in ordered_timings(timings) if k != "request_to_serving"][::-1]
    right.barh([k for k, _ in steps], [v for _, v in steps])
    right.set_xlabel("seconds")
    right.set_title(f"request to serving: {timings.get('request_to_serving', float('nan')):.1f}s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of a report (what ``tmu-admin report`` prints)."""
    m, t = report["metrics"], report.get("timings", {})
    lines = [f"job {report.get('job_id')}  model {report.get('model')}  v{report.get('from_version')} -> "
             f"v{report.get('to_version')}  method {report.get('method')}"]
    if report.get("kind") == "retrain":
        caught = report.get("caught_up")
        lines += [f"{'retrain' if caught else 'exact retrain'} on {m['trained_on']} retained samples: "
                  f"{report.get('reason')}",
                  f"{'metric':<12}{'before':>10}{'after':>10}",
                  f"{'ACC_Dtest':<12}{m['acc_test_before']:>10.2f}{m['acc_test_after']:>10.2f}"]
        if caught:
            lines.append(f"caught up with {caught['samples']} samples forgotten while it trained ({caught['method']}, "
                         f"{caught['seconds']:.1f}s): ACC_Dtest {m['acc_test_retrained']:.2f} retrained, "
                         f"{m['acc_test_after']:.2f} after")
    else:
        lines += [f"forget set: {m['forget_size']} samples (D_test: {m['test_size']})",
                  f"{'metric':<12}{'before':>10}{'after':>10}",
                  f"{'ACC_Dtest':<12}{m['acc_test_before']:>10.2f}{m['acc_test_after']:>10.2f}",
                  f"{'ACC_Df':<12}{m['acc_forget_before']:>10.2f}{m['acc_forget_after']:>10.2f}",
                  f"{'ASR_Df':<12}{m['asr_before']:>10.2f}{m['asr_after']:>10.2f}"]
        if m.get("predicted_hard") is not None:
            lines.append(f"predicted hard/easy: {m['predicted_hard']}/{m['predicted_easy']}")
    forgetting = report.get("forgetting")
    if forgetting:
        lines.append(forgetting_line(forgetting))
    lines.append("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in ordered_timings(t)))
    return "\n".join(lines)


def forgetting_line(forgetting: dict[str, Any]) -> str:
    """What kind of forgetting a version is, and for an approximate one, where its exact retrain stands."""
    if forgetting.get("kind") == "exact":
        return f"forgetting: exact (retrained; replaces {forgetting.get('replaces_kind')} v{forgetting.get('replaces')})"
    caught = forgetting.get("caught_up")
    if caught:
        return (f"forgetting: retrained, then {caught['samples']} samples forgotten during the training unlearned by "
                f"{forgetting.get('method')} (approximate; replaces {forgetting.get('replaces_kind')} "
                f"v{forgetting.get('replaces')}); its drift counts from the retrained network")
    drift, retrain = forgetting.get("drift") or {}, forgetting.get("retrain") or {}
    error = f" +- {drift['cost_se']:.2f}" if drift.get("cost_se") is not None else ""
    line = (f"forgetting: approximate ({forgetting.get('method')}), {drift.get('forgets')} forget job(s) and "
            f"{drift.get('cost', 0):+.2f}{error} ACC_Dtest points since exact v{forgetting.get('exact_base')}")
    if forgetting.get("waited_for"):
        line += f" (waited for retrain {', '.join(forgetting['waited_for'])} past the hold level)"
    scheduled = retrain.get("scheduled")
    if scheduled and scheduled.get("queued"):
        return line + f"; exact retrain {scheduled['job_id']} queued now: {scheduled['reason']}"
    if scheduled:
        return line + f"; retrain due ({scheduled['reason']}) but not queued: {scheduled.get('note')}"
    policy = retrain.get("policy") or {}
    if not any(policy.get(k) is not None for k in ("budget", "max_forgets", "max_age_s")):
        return line + "; no exact retrain is scheduled (drift budget off)"
    limits = [f"{retrain['cost_left']:.2f} points of budget left" if "cost_left" in retrain else "",
              f"{retrain['forgets_left']} forget job(s) left" if "forgets_left" in retrain else "",
              f"due at {retrain['due_at']}" if "due_at" in retrain else ""]
    return line + "; next exact retrain: " + ", ".join(x for x in limits if x)


def metrics_dict(metrics: ForgetMetrics) -> dict[str, Any]:
    """A :class:`ForgetMetrics` as a JSON-ready dict (without the per-image masks)."""
    return {k: v for k, v in asdict(metrics).items() if not k.startswith("test_right_")}
