"""Benchmark a forget request's hot swap under load, and its cost beside retraining.

On the quickstart model (scikit-learn digits, small CNN), while 16 client threads send predictions to TorchServe
without pause (each thread one request at a time, on loopback), a forget request for 100 training samples runs
through the extension service: TMU, package, register v2, set default, drain and unregister v1. The script counts
failed predictions and latency percentiles (all requests, and those sent during the swap itself), then times a
retrain from scratch on the retained data with the same recipe. v1's TMU artifacts are prepared before the
request (as the worker does for each new version after a swap); that time is reported on its own.

Usage: python scripts/bench_swap.py [--dir bench-swap] [--threads 16] [--samples 100] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import requests


@dataclass(frozen=True)
class Shot:
    """One prediction request: when it was sent (epoch seconds), how long it took, and how it ended."""

    sent: float
    seconds: float
    ok: bool
    version: str


def _client_loop(url: str, token: str, image: bytes, stop: threading.Event, shots: list[Shot]) -> None:
    session = requests.Session()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    while not stop.is_set():
        sent = time.time()
        try:
            resp = session.post(url, data=image, headers=headers, timeout=30)
            ok = resp.status_code == 200
            version = resp.json().get("model_version", "?") if ok else f"HTTP {resp.status_code}"
        except (requests.RequestException, ValueError) as err:
            ok, version = False, type(err).__name__
        shots.append(Shot(sent, time.time() - sent, ok, str(version)))


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    return {"p50_ms": 1000 * pick(0.5), "p95_ms": 1000 * pick(0.95), "p99_ms": 1000 * pick(0.99),
            "max_ms": 1000 * ordered[-1], "mean_ms": 1000 * statistics.fmean(ordered)}


def _summary(shots: list[Shot]) -> dict:
    versions: dict[str, int] = {}
    for shot in shots:
        versions[shot.version] = versions.get(shot.version, 0) + 1
    return {"requests": len(shots), "failed": sum(not s.ok for s in shots), "versions": versions,
            **_percentiles([s.seconds for s in shots if s.ok])}


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _setup(args: argparse.Namespace) -> dict:
    """Index digits, train and package v1, prepare its artifacts; returns what the run needs."""
    from tmu_core.config import Workspace
    from tmu_core.device import resolve_device
    from tmu_core.forget.artifacts import prepare_version
    from tmu_core.service.quickstart import MODEL, QuickstartConfig, build_index, sample_png, train_v1

    shutil.rmtree(args.dir, ignore_errors=True)
    config = QuickstartConfig(folder=args.dir, epochs=args.epochs, device="cpu")
    workspace = Workspace(home=args.dir / ".tmu", model_store=args.dir / "model_store")
    index = build_index(workspace, config)
    started = time.perf_counter()
    v1 = train_v1(workspace, index, config, resolve_device("cpu"))
    train_s = time.perf_counter() - started
    train_ids = index.ids("train")
    return {"config": config, "workspace": workspace, "index": index, "v1": v1, "model": MODEL,
            "original_train_s": train_s, "prepare_v1_s": prepare_version(workspace, MODEL, device="cpu"),
            "forget": train_ids[:: max(1, len(train_ids) // args.samples)][: args.samples],
            "image": sample_png(index, index.ids("test")[0])}


def _swap_under_load(args: argparse.Namespace, env: dict) -> tuple[dict, list[Shot]]:
    """Serve v1, start the client threads, run the forget request to the end, stop the clients."""
    from tmu_core.service.client import ExtensionClient
    from tmu_core.forget.dispatcher import WorkerSettings
    from tmu_core.service.server import ServiceConfig, in_process
    from tmu_core.serving import TorchServe, TorchServeConfig

    workspace, model = env["workspace"], env["model"]
    server = TorchServe(workspace, TorchServeConfig.with_free_ports(workspace.model_store))
    server.start([f"{model}={env['v1'].archive.name}"])
    shots: list[Shot] = []
    stop = threading.Event()
    try:
        server.wait_ready(model, timeout=120)
        url = f"{server.config.url('inference')}/predictions/{model}"
        threads = [threading.Thread(target=_client_loop, args=(url, server.keys().inference, env["image"], stop,
                                                               shots)) for _ in range(args.threads)]
        with in_process(workspace, ServiceConfig(worker=WorkerSettings(device="cpu"))) as service:
            for thread in threads:
                thread.start()
            time.sleep(2.0)
            client = ExtensionClient(service.url, service.key)
            job = client.wait(client.forget(model, sample_ids=env["forget"])["job_id"], timeout=900)
            time.sleep(2.0)
            stop.set()
            for thread in threads:
                thread.join()
    finally:
        stop.set()
        server.stop()
    if job["state"] != "succeeded":
        raise SystemExit(f"forget job failed: {job['reason']}")
    return job, shots


def _retrain_seconds(env: dict) -> float:
    """Train the same recipe from scratch on what the index retains now."""
    from tmu_core.device import resolve_device
    from tmu_core.train import TrainConfig, train_model

    config, index = env["config"], env["index"]
    cfg = TrainConfig(epochs=config.epochs, batch_size=64, lr=0.05, augment=False, seed=config.seed)
    started = time.perf_counter()
    train_model(index, index.ids("train"), "small_cnn", cfg, resolve_device("cpu"))
    return time.perf_counter() - started


def _run(args: argparse.Namespace) -> dict:
    env = _setup(args)
    job, shots = _swap_under_load(args, env)
    retrain_s = _retrain_seconds(env)
    env["index"].close()
    steps = {s["step"]: _epoch(s["at"]) for s in job["steps"]}
    swap_start, swap_end = steps["register"], _epoch(job["finished_at"])
    during = [s for s in shots if swap_start <= s.sent <= swap_end]
    return {"threads": args.threads, "forget_samples": len(env["forget"]), "all": _summary(shots),
            "during_swap": _summary(during), "swap_window_s": swap_end - swap_start,
            "timings": job["result"]["timings"], "request_to_serving_s": job["result"]["timings"]["request_to_serving"],
            "retrain_s": retrain_s, "original_train_s": env["original_train_s"], "prepare_v1_s": env["prepare_v1_s"],
            "slow_by_step": _slow_by_step(shots, steps, 1.0), "metrics": job["result"]["metrics"]}


def _slow_by_step(shots: list[Shot], steps: dict[str, float], threshold_s: float) -> dict[str, int]:
    """How many requests slower than ``threshold_s`` were sent during each pipeline step."""
    order = sorted(steps.items(), key=lambda item: item[1])
    counts: dict[str, int] = {}
    for shot in shots:
        if shot.seconds <= threshold_s:
            continue
        phase = "before job" if not order or shot.sent < order[0][1] else \
            [name for name, start in order if start <= shot.sent][-1]
        counts[phase] = counts.get(phase, 0) + 1
    return counts


def _table(result: dict) -> str:
    rows = ["| requests sent | " + " | ".join(str(result[k]["requests"]) for k in ("all", "during_swap")) + " |",
            "| failed | " + " | ".join(str(result[k]["failed"]) for k in ("all", "during_swap")) + " |"]
    for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
        rows.append(f"| latency {key[:-3]} (ms) | " + " | ".join(f"{result[k].get(key, float('nan')):.1f}"
                                                               for k in ("all", "during_swap")) + " |")
    rows.append("| answers by version | " + " | ".join(json.dumps(result[k]["versions"])
                                                      for k in ("all", "during_swap")) + " |")
    head = ["| | whole run | during swap (register .. job done) |", "|---|---|---|"]
    cost = ["", "| forget 100 samples | seconds |", "|---|---|",
            f"| request -> new version serving | {result['request_to_serving_s']:.1f} |",
            f"| retrain from scratch on D_r (same recipe) | {result['retrain_s']:.1f} |",
            f"| swap window (register .. job done) | {result['swap_window_s']:.1f} |",
            f"| prepare v1 artifacts (once per version, before requests) | {result['prepare_v1_s']:.1f} |"]
    from tmu_core.forget.report import ordered_timings

    cost += [f"| step {k} | {v:.2f} |" for k, v in ordered_timings(result["timings"]) if k != "request_to_serving"]
    slow = ["", "requests slower than 1 s, by the step running when they were sent: "
            + (json.dumps(result["slow_by_step"]) if result["slow_by_step"] else "none")]
    return "\n".join(head + rows + cost + slow)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("bench-swap"), help="scratch folder (replaced)")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    args.dir = args.dir.absolute()
    result = _run(args)
    print(_table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
