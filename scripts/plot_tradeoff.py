"""The picture users read first: each method's Delta against its request time, and against its ACC_Dtest.

Reads the ``results.json`` of one or more ``tmu-admin evaluate`` runs (e.g. one per forget shape, same seed and
cache) and draws two panels, one marker per method and run, from the runs' mean rows:

    .venv/bin/python scripts/plot_tradeoff.py --out docs/tradeoff.png \\
        class=runs/class-s0/results.json random=runs/random-s0/results.json owner=runs/owner-s0/results.json

Left: Delta (points from the gold's ACC_Df, lower is better) against the request's seconds (log scale; the gold
is placed at its retraining time). Right: Delta against ACC_Dtest (the gold's ACC_Dtest is the line to be on), or
against ACC_wide when every run scored it (``tmu-admin evaluate --wide-test``: far less sampling noise).
The gold-floor row (a second gold with another seed) is drawn as a dashed line: no method can be read as
better than that.

Runs given under the same NAME are pooled into one marker per method: each point is the mean of the method's mean
rows over the runs that have it, e.g. one run per seed (``class=runs/class-s0/results.json
class=runs/class-s1/results.json ...``) or runs of other methods on the same seed and cache. The floor and gold
lines are then their means too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SKIP = {"original", "retrain"}
MARKERS = "osD^v<>P*X"


def _runs(specs: list[str]) -> list[tuple[str, dict]]:
    """One (name, run) per NAME; the runs given under one NAME pooled (see the module docstring)."""
    pooled: dict[str, list[dict]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"give each run as NAME=PATH/results.json, got {spec!r}")
        pooled.setdefault(name, []).append(json.loads(Path(path).read_text()))
    return [(name, _pool(runs)) for name, runs in pooled.items()]


def _pool(runs: list[dict]) -> dict:
    """The runs' mean rows averaged per method over the runs that have it."""
    rows: dict[str, list[dict]] = {}
    for run in runs:
        for row in run["means"]:
            rows.setdefault(row["method"], []).append(row)
    means = []
    for method, group in rows.items():
        row = dict(group[0])
        for key in ("delta", "seconds", "acc_dtest", "acc_wide"):
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = sum(values) / len(values) if len(values) == len(group) else None
        means.append(row)
    wide = all(run["protocol"].get("wide_test") for run in runs)
    return {"protocol": {**runs[0]["protocol"], "wide_test": wide}, "means": means}


def plot(runs: list[tuple[str, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_acc) = plt.subplots(1, 2, figsize=(13, 5.5))
    accuracy = "acc_wide" if all(run["protocol"].get("wide_test") for _, run in runs) else "acc_dtest"
    methods = sorted({row["method"] for _, run in runs for row in run["means"]
                      if row["kind"] in ("method", "gold") and row["method"] not in SKIP})
    colors = {method: plt.cm.tab20(i % 20) for i, method in enumerate(methods)}
    for r, (name, run) in enumerate(runs):
        rows = {row["method"]: row for row in run["means"]}
        marker = MARKERS[r % len(MARKERS)]
        for method in methods:
            row = rows.get(method)
            if row is None:
                continue
            label = method if r == 0 else None
            ax_time.scatter(row["seconds"], row["delta"], color=colors[method], marker=marker, s=45, label=label)
            ax_acc.scatter(row[accuracy], row["delta"], color=colors[method], marker=marker, s=45)
            if method == "tmu":
                ax_time.annotate(f"{method} ({name})", (row["seconds"], row["delta"]), fontsize=7,
                                 xytext=((6, 6), (6, -12), (-62, 6))[r % 3], textcoords="offset points")
        floor = rows.get("gold-floor")
        if floor is not None:
            for ax in (ax_time, ax_acc):
                ax.axhline(floor["delta"], color="grey", linestyle="--", linewidth=0.8)
        gold = rows.get("gold")
        if gold is not None:
            ax_acc.axvline(gold[accuracy], color="grey", linestyle=":", linewidth=0.8)
    ax_time.set_xscale("log")
    ax_time.set_xlabel("request seconds (gold: its retraining), log scale")
    ax_time.set_ylabel("Delta = |ACC_Df - gold ACC_Df| (points, lower is better)")
    ax_acc.set_xlabel(("ACC on the unseen test images, --wide-test" if accuracy == "acc_wide" else "ACC_Dtest")
                      + " (%) (dotted: the gold's)")
    ax_acc.set_ylabel("Delta (points)")
    shapes = ", ".join(f"{MARKERS[r % len(MARKERS)]} = {name}" for r, (name, _) in enumerate(runs))
    ax_time.legend(fontsize=7, ncol=2, title=f"markers: {shapes}", title_fontsize=7)
    fig.suptitle("Each method's Delta against its request time and its test accuracy "
                 "(mean rows; runs of one name pooled)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=PATH/results.json, one per run")
    parser.add_argument("--out", type=Path, default=Path("docs/tradeoff.png"))
    args = parser.parse_args(argv)
    plot(_runs(args.runs), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
