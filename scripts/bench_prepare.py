"""Benchmark: TMU's preparation of the next version, full build against incremental update, and what it changes.

On the CIFAR-10 model of ``scripts/bench_scale.py`` (its index and ``small_cnn`` trained with the quickstart's
recipe, built or reused under ``--work``), the script runs ``--requests`` sequential forget requests of
``--forget`` training samples, each on the version the previous one made, as the worker's pipeline does:

- v1 is prepared by a full build (``tmu_core.forget.artifacts.prepare``);
- after request k (v_k -> v_k+1), v_k+1 is prepared twice, from the same model and ids: incrementally from
  v_k's in-memory state (``prepare(..., parent=...)``, what ``prepare_next`` does) and by a full build;
- request k+1 then runs on v_k+1 twice, once with each state (a fresh method each, the same seeds), and the
  two outcomes are compared: agreement of the easy/hard predictions, ACC on D_f and on the evaluation half of
  the test set (D_test here), the fine-tune's steps. The chain goes on from the incremental state's outcome.

No gold retrain: at 5,000 images one takes about as long as this whole run.

Example (about 6 minutes on 2 shared CPU cores)::

    OMP_NUM_THREADS=1 python scripts/bench_prepare.py --work /tmp/bench-prepare --size 5000
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale  # noqa: E402  (its index, model and clock helpers)

DEVICE = torch.device("cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=bench_scale.DEFAULT_ZIP, help="CIFAR-10 ImageFolder zip")
    parser.add_argument("--work", type=Path, required=True, help="folder for the index, model and artifacts")
    parser.add_argument("--size", type=int, default=5000, help="training-set size")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the original model's recipe")
    parser.add_argument("--forget", type=int, default=20, help="training samples per forget request")
    parser.add_argument("--requests", type=int, default=5, help="sequential forget requests")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser.parse_args(argv)


def _scale_args(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace bench_scale's helpers read (same index and model layout under ``--work``)."""
    return bench_scale.parse_args(["--work", str(args.work), "--zip", str(args.zip), "--epochs", str(args.epochs),
                                   "--test-per-class", str(args.test_per_class), "--sizes", str(args.size)])


def _timed_prepare(model: Any, meta: Any, view: Any, plan: Any, folder: Path, parent: Any = None,
                   origin: str | None = None) -> tuple[Any, float, float]:
    """A fresh ``tmu`` method prepared for one version (incrementally from ``parent`` when given), timed."""
    from tmu_core.forget.artifacts import prepare
    from tmu_core.unlearn import get_method

    method = get_method("tmu")
    clock = bench_scale.Clock()
    prepare(method, model, meta, view, plan, DEVICE, folder, parent=parent, origin=origin)
    wall, cpu = clock.read()
    return method, wall, cpu


def _accuracy(model: Any, images: torch.Tensor, labels: torch.Tensor) -> float:
    from tmu_core.unlearn.common import correct_of

    return 100.0 * correct_of(model, images, labels, DEVICE).float().mean().item()


def _request(method: Any, model: Any, meta: Any, data: Any, test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    clock = bench_scale.Clock()
    outcome = method.unlearn(model, meta, data, DEVICE, None)
    wall, _ = clock.read()
    forget_images, forget_labels = data.tensors("forget")
    return {"outcome": outcome, "seconds": wall, "hard": set(outcome.predicted_hard_ids),
            "acc_df": _accuracy(outcome.model, forget_images, forget_labels),
            "acc_test": _accuracy(outcome.model, *test), "steps": outcome.details["steps"]}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tmu_core.forget.artifacts import DataPlan, plan_data
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import load_checkpoint
    from tmu_core.unlearn import UnlearnData

    importlib.import_module("torch._dynamo")  # imported on the first Adam step: a worker's one-time cost
    scale = _scale_args(args)
    bench_scale.phase_train(scale, args.size)  # trains only when no model is stored
    paths = bench_scale._paths(scale, args.size)
    out = args.work / f"n{args.size}" / "prepare-bench"
    model, meta = load_checkpoint(paths["model"], DEVICE)
    rows = []
    with bench_scale._open_index(scale, args.size) as index:
        view = index.view(Preprocess.from_meta(meta))
        plan = plan_data(index, 0.5, 0, index.ids("train"))
        test = (view.load(list(plan.eval_ids)), view.labels(list(plan.eval_ids)))
        method, wall, cpu = _timed_prepare(model, meta, view, plan, out / "v1")
        print(f"v1 full build: {wall:.1f}s wall, {cpu:.1f}s CPU", file=sys.stderr, flush=True)
        rows.append({"version": 1, "full_s": wall, "full_cpu_s": cpu})
        full_method = None  # v_k's state by a full build, from the second version on
        for k in range(1, args.requests + 1):
            forget = bench_scale._forget_ids(list(plan.train_ids), args.forget)
            retain = tuple(i for i in plan.train_ids if i not in set(forget))
            data = UnlearnData(view, forget, retain, plan.twin_ids)
            ran = _request(method, model, meta, data, test)
            if full_method is not None:  # the same request with a full build's state of the same version
                full = _request(full_method, model, meta, UnlearnData(view, forget, retain, plan.twin_ids), test)
                row = rows[-1]
                row.update({"request_s": ran["seconds"], "hard_inc": len(ran["hard"]), "hard_full": len(full["hard"]),
                            "agree": 100.0 * sum((i in ran["hard"]) == (i in full["hard"]) for i in forget) / len(forget),
                            "acc_df_inc": ran["acc_df"], "acc_df_full": full["acc_df"],
                            "acc_test_inc": ran["acc_test"], "acc_test_full": full["acc_test"],
                            "steps_inc": ran["steps"], "steps_full": full["steps"]})
                print(f"request {k}: {json.dumps({k2: v for k2, v in row.items()})}", file=sys.stderr, flush=True)
            if k == args.requests:
                break
            model = ran["outcome"].model.eval()
            plan = DataPlan(retain, plan.twin_ids, plan.eval_ids)
            version = k + 1
            parent = method.prepared
            method, inc_wall, inc_cpu = _timed_prepare(model, meta, view, plan, out / f"v{version}-inc", parent,
                                                      f"v{k}")
            info = method.prepared.info
            full_method, full_wall, full_cpu = _timed_prepare(model, meta, view, plan, out / f"v{version}-full")
            rows.append({"version": version, "inc_s": inc_wall, "inc_cpu_s": inc_cpu, "full_s": full_wall,
                         "full_cpu_s": full_cpu, "chain": info["chain"], "kind": info["kind"],
                         "cf": "retrained" if "cf_model" in info.get("recomputed", ()) else "kept",
                         "inc_features_s": info["timings"]["original_features"],
                         "inc_cf_s": info["timings"]["cf_model"]})
            print(f"v{version} prepared: incremental {inc_wall:.1f}s, full {full_wall:.1f}s", file=sys.stderr,
                  flush=True)
    return rows


COLUMNS = [("version", "version"), ("full build s (wall / CPU)", ("full_s", "full_cpu_s")),
           ("incremental s (wall / CPU)", ("inc_s", "inc_cpu_s")),
           ("incremental: features / CF s", ("inc_features_s", "inc_cf_s")), ("CF model", "cf"),
           ("next request s (incremental state)", "request_s"),
           ("predicted hard (inc / full)", ("hard_inc", "hard_full")), ("easy/hard agreement %", "agree"),
           ("ACC D_f (inc / full)", ("acc_df_inc", "acc_df_full")),
           ("ACC D_test (inc / full)", ("acc_test_inc", "acc_test_full")),
           ("steps (inc / full)", ("steps_inc", "steps_full"))]


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    return "-" if value is None else str(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| " + " | ".join(title for title, _ in COLUMNS) + " |")
    print("|" + " --- |" * len(COLUMNS))
    for row in rows:
        cells = []
        for _, keys in COLUMNS:
            keys = (keys,) if isinstance(keys, str) else keys
            cells.append(" / ".join(_value(row.get(key)) for key in keys))
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"load average at the start: {os.getloadavg()}", file=sys.stderr, flush=True)
    rows = run(args)
    print_table(rows)
    print(f"load average at the end: {os.getloadavg()}", file=sys.stderr, flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
