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
import shutil
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
    parser.add_argument("--floor-versions", type=int, default=1,
                        help="versions where a full build with seed 1 gives the seed's own effect (60 s each)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser.parse_args(argv)


def _scale_args(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace bench_scale's helpers read (same index and model layout under ``--work``)."""
    return bench_scale.parse_args(["--work", str(args.work), "--zip", str(args.zip), "--epochs", str(args.epochs),
                                   "--test-per-class", str(args.test_per_class), "--sizes", str(args.size)])


def _timed_prepare(model: Any, meta: Any, view: Any, plan: Any, folder: Path, parent: Any = None,
                   origin: str | None = None, seed: int = 0) -> tuple[Any, float, float]:
    """A fresh ``tmu`` method (default options but ``seed``) prepared for one version (incrementally from
    ``parent`` when given), timed."""
    from tmu_core.forget.artifacts import prepare
    from tmu_core.unlearn import get_method

    method = get_method("tmu", seed=seed)
    clock = bench_scale.Clock()
    prepare(method, model, meta, view, plan, DEVICE, folder, parent=parent, origin=origin)
    wall, cpu = clock.read()
    return method, wall, cpu


def _accuracy(model: Any, images: torch.Tensor, labels: torch.Tensor) -> float:
    from tmu_core.unlearn.common import correct_of

    return 100.0 * correct_of(model, images, labels, DEVICE).float().mean().item()


def _request(method: Any, model: Any, meta: Any, data: Any, test: tuple[torch.Tensor, torch.Tensor],
             workdir: Path | None = None) -> dict[str, Any]:
    clock = bench_scale.Clock()
    outcome = method.unlearn(model, meta, data, DEVICE, workdir)
    wall, _ = clock.read()
    forget_images, forget_labels = data.tensors("forget")
    return {"seconds": wall, "hard": set(outcome.predicted_hard_ids), "model": outcome.model.eval(),
            "acc_df": _accuracy(outcome.model, forget_images, forget_labels),
            "acc_test": _accuracy(outcome.model, *test), "steps": outcome.details["steps"]}


def _refitted(state: Any, options: Any, folder: Path) -> Path:
    """``state`` with its classifier refitted on its own twin columns and labels, saved under ``folder``."""
    from dataclasses import replace

    from tmu_core.unlearn.prepared import save_prepared
    from tmu_core.unlearn.twin import fit_twin_classifier

    classifier = fit_twin_classifier(state.twin_columns, state.twin_easy, options, DEVICE)
    save_prepared(replace(state, classifier=classifier, info={**state.info, "classifier": "refitted"}), folder)
    return folder


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Preparation rows (one per version) and request rows (one per version and state)."""
    from tmu_core.forget.artifacts import DataPlan, plan_data
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import load_checkpoint
    from tmu_core.unlearn import UnlearnData, get_method

    importlib.import_module("torch._dynamo")  # imported on the first Adam step: a worker's one-time cost
    scale = _scale_args(args)
    bench_scale.phase_train(scale, args.size)  # trains only when no model is stored
    out = args.work / f"n{args.size}" / "prepare-bench"
    shutil.rmtree(out, ignore_errors=True)  # a state left by an earlier run would be reloaded, not built
    model, meta = load_checkpoint(bench_scale._paths(scale, args.size)["model"], DEVICE)
    prepared, requests = [], []
    with bench_scale._open_index(scale, args.size) as index:
        view = index.view(Preprocess.from_meta(meta))
        plan = plan_data(index, 0.5, 0, index.ids("train"))
        test = (view.load(list(plan.eval_ids)), view.labels(list(plan.eval_ids)))
        method, wall, cpu = _timed_prepare(model, meta, view, plan, out / "v1")
        prepared.append({"version": 1, "full_s": wall, "full_cpu_s": cpu, "chain": 0})
        print(f"v1 full build: {wall:.1f}s wall, {cpu:.1f}s CPU", file=sys.stderr, flush=True)
        others: dict[str, tuple[Any, Path | None]] = {}  # the other states of the version, by name
        for k in range(1, args.requests + 1):
            forget = bench_scale._forget_ids(list(plan.train_ids), args.forget)
            retain = tuple(i for i in plan.train_ids if i not in set(forget))

            def data() -> Any:
                return UnlearnData(view, forget, retain, plan.twin_ids)

            ran = _request(method, model, meta, data(), test)
            if others:
                forget_images, forget_labels = data().tensors("forget")
                requests.append({"version": k, "state": "the model before the request",
                                 "acc_df": _accuracy(model, forget_images, forget_labels),
                                 "acc_test": _accuracy(model, *test)})
                results = {"incremental": ran, **{name: _request(other, model, meta, data(), test, folder)
                                                  for name, (other, folder) in others.items()}}
                full = results["full"]["hard"]
                for name, result in results.items():
                    requests.append({"version": k, "state": name, "hard": len(result["hard"]),
                                     "agree": 100.0 * sum((i in result["hard"]) == (i in full) for i in forget)
                                     / len(forget), "acc_df": result["acc_df"], "acc_test": result["acc_test"],
                                     "steps": result["steps"], "request_s": result["seconds"]})
                print(f"request {k}: {json.dumps(requests[-len(results) - 1:])}", file=sys.stderr, flush=True)
            if k == args.requests:
                break
            model = ran["model"]
            plan = DataPlan(retain, plan.twin_ids, plan.eval_ids)
            version = k + 1
            parent = method.prepared
            method, inc_wall, inc_cpu = _timed_prepare(model, meta, view, plan, out / f"v{version}-inc", parent,
                                                      f"v{k}")
            info = method.prepared.info
            full_method, full_wall, full_cpu = _timed_prepare(model, meta, view, plan, out / f"v{version}-full")
            others = {"full": (full_method, None),
                      "incremental, classifier refitted": (get_method("tmu"), _refitted(
                          method.prepared, method.options, out / f"v{version}-refit"))}
            if version - 1 <= args.floor_versions:  # the seed's own effect: a full build and request with seed 1
                seeded, _, _ = _timed_prepare(model, meta, view, plan, out / f"v{version}-seed1", seed=1)
                others["full, seed 1"] = (seeded, None)
            prepared.append({"version": version, "inc_s": inc_wall, "inc_cpu_s": inc_cpu, "full_s": full_wall,
                             "full_cpu_s": full_cpu, "chain": info["chain"],
                             "cf": "retrained" if "cf_model" in info.get("recomputed", ()) else "kept",
                             "inc_features_s": info["timings"]["original_features"],
                             "inc_cf_s": info["timings"]["cf_model"]})
            print(f"v{version} prepared: {json.dumps(prepared[-1])}", file=sys.stderr, flush=True)
    return prepared, requests


PREPARED_COLUMNS = [("version", "version"), ("full build s (wall / CPU)", ("full_s", "full_cpu_s")),
                    ("incremental s (wall / CPU)", ("inc_s", "inc_cpu_s")),
                    ("incremental: features / CF model s (wall)", ("inc_features_s", "inc_cf_s")),
                    ("CF model", "cf"), ("chain", "chain")]
REQUEST_COLUMNS = [("version", "version"), ("state", "state"), ("predicted hard", "hard"),
                   ("easy/hard agreement with full %", "agree"), ("ACC D_f", "acc_df"), ("ACC D_test", "acc_test"),
                   ("steps", "steps"), ("request s", "request_s")]


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    return "-" if value is None else str(value)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, Any]]) -> None:
    print("| " + " | ".join(title for title, _ in columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        cells = []
        for _, keys in columns:
            keys = (keys,) if isinstance(keys, str) else keys
            cells.append(" / ".join(_value(row.get(key)) for key in keys))
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = {"start": os.getloadavg()}
    prepared, requests = run(args)
    load["end"] = os.getloadavg()
    print_table(prepared, PREPARED_COLUMNS)
    print()
    print_table(requests, REQUEST_COLUMNS)
    print(f"load average (1, 5, 15 min) at the start {load['start']}, at the end {load['end']}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps({"prepared": prepared, "requests": requests, "load": load}, indent=2))


if __name__ == "__main__":
    main()
