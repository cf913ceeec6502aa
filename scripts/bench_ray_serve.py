"""Prediction throughput of Ray Serve with 1 and 2 replicas against TorchServe on the same model and input, and
the failed requests while a new version is swapped in under load (through ``tmu_core.service.swap``, the seam the
forget pipeline uses), on each backend.

Everything is on loopback: TorchServe with one worker, and a Ray cluster of a head (no CPUs) and two worker nodes
of one CPU each, started and stopped by this script. Every setup runs the same ONNX archive (small_cnn 32x32x3,
10 classes, one intra-op thread) on the same JPEG bodies; request counts and the swap's load are bounded.

Usage::

    OMP_NUM_THREADS=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python scripts/bench_ray_serve.py \\
        --requests 400 --concurrency 16
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1 (see docs/ray.md)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests  # noqa: E402
import torch  # noqa: E402

from bench_serving import CLASSES, MEAN, STD, Row, load_jpegs, print_table, run_load  # noqa: E402
from tmu_core.config import Workspace  # noqa: E402
from tmu_core.models import build_model  # noqa: E402
from tmu_core.serving.archive import package_version  # noqa: E402
from tmu_core.serving.backend import BackendSpec, free_port, write_backend  # noqa: E402
from tmu_core.serving.torchserve import TorchServe, TorchServeConfig  # noqa: E402
from tmu_core.train import CheckpointMeta, save_checkpoint  # noqa: E402

MODEL = "bench"


def build_versions(root: Path, workspace: Workspace, batch_size: int, delay: int) -> None:
    """Versions 1 and 2 (other weights) of the benchmark model, ONNX backend, one thread."""
    meta = CheckpointMeta("small_cnn", 10, CLASSES, 3, 32, MEAN, STD, 0, {}, "bench", 0)
    for version in (1, 2):
        torch.manual_seed(version)
        model = build_model("small_cnn", 10, 3, 32, MEAN, STD).eval()
        ckpt = save_checkpoint(root / f"v{version}.pt", model, meta)
        package_version(ckpt, workspace, MODEL, version, backend="onnx", batch_size=batch_size,
                        max_batch_delay=delay, top_k=5, threads=1)


def swap_under_load(url: str, headers: dict[str, str], body: bytes, concurrency: int, swap_fn,
                    max_s: float = 300.0) -> dict[str, object]:
    """Run ``swap_fn`` while ``concurrency`` clients post ``body``; the requests, failures and versions seen."""
    stop, lock = threading.Event(), threading.Lock()
    seen: list[tuple[int, str | None]] = []

    def client() -> None:
        deadline = time.monotonic() + max_s
        with requests.Session() as session:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    reply = session.post(url, data=body, headers=headers, timeout=60)
                    answer = (reply.status_code, reply.json().get("model_version") if reply.ok else None)
                except (requests.RequestException, ValueError):
                    answer = (-1, None)
                with lock:
                    seen.append(answer)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    started = time.perf_counter()
    try:
        swap_fn()
    finally:
        seconds = time.perf_counter() - started
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
    return {"requests": len(seen), "failed": sum(status != 200 for status, _ in seen), "swap_s": seconds,
            "versions": sorted({v for _, v in seen if v})}


def pipeline_swap(workspace: Workspace) -> None:
    """What a forget job does after its commit: register v2, make it the default, drain v1, unregister it."""
    from tmu_core.service import swap

    settings = swap.SwapSettings(drain_grace_s=0.5)
    swap.register(workspace, MODEL, 2, workspace.archive_path(MODEL, 2), settings)
    swap.serve_only(workspace, MODEL, 2, workspace.archive_path(MODEL, 2), None, settings)
    swap.drain(workspace, MODEL, 1, settings)
    swap.unregister(workspace, MODEL, 1)


def bench_torchserve(workspace: Workspace, jpegs: list[bytes], args) -> tuple[Row, dict[str, object]]:
    server = TorchServe(workspace, TorchServeConfig.with_free_ports(workspace.model_store))
    server.start([f"{MODEL}={MODEL}-v1.mar"])
    try:
        server.wait_ready(MODEL, timeout=180)
        url, token = f"{server.config.url('inference')}/predictions/{MODEL}", server.keys().inference
        errors, seconds, lat = run_load(url, token, jpegs, "image/jpeg", args.concurrency, args.requests,
                                        args.warmup)
        row = Row("TorchServe, 1 worker", args.concurrency, args.requests, errors, seconds, tuple(lat))
        print(f"done: {row.name}: {row.throughput:.1f} img/s", file=sys.stderr)
        swapped = swap_under_load(url, {"Authorization": f"Bearer {token}"}, jpegs[0], args.concurrency,
                                  lambda: pipeline_swap(workspace))
    finally:
        server.stop()
    return row, swapped


def bench_ray(root: Path, jpegs: list[bytes], args) -> tuple[list[Row], dict[str, object]]:
    import ray
    from ray.cluster_utils import Cluster

    from tmu_core.serving.ray_control import RayServeBackend

    workspace = Workspace(home=root / "ray-home", model_store=root / "store")
    workspace.ensure_dirs()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    rows, port = [], free_port()
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes(timeout=120)
        for replicas in (1, 2):
            spec = BackendSpec(kind="ray", address=cluster.address, http_port=port, replicas=replicas,
                               max_batch_size=args.batch_size, batch_wait_timeout_s=args.max_batch_delay / 1000)
            write_backend(workspace.serve_dir, spec)
            backend = RayServeBackend(workspace, spec)
            check = backend.deploy(MODEL, 1)
            url = f"{spec.url}/predictions/{MODEL}"
            errors, seconds, lat = run_load(url, backend.token, jpegs, "image/jpeg", args.concurrency,
                                            args.requests, args.warmup)
            nodes = len(set(check.nodes.values()))
            rows.append(Row(f"Ray Serve, {replicas} replica(s) on {nodes} node(s)", args.concurrency,
                            args.requests, errors, seconds, tuple(lat)))
            print(f"done: {rows[-1].name}: {rows[-1].throughput:.1f} img/s", file=sys.stderr)
        swapped = swap_under_load(url, backend.headers, jpegs[0], args.concurrency, lambda: pipeline_swap(workspace))
        backend.undeploy(MODEL)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return rows, swapped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="Requests per throughput setup.")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16, help="Client threads, for throughput and swap.")
    parser.add_argument("--batch-size", type=int, default=8, help="Batch size of every setup.")
    parser.add_argument("--max-batch-delay", type=int, default=5, help="Batch wait of every setup (ms).")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary workspace.")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(tempfile.mkdtemp(prefix="tmu-bench-ray-"))
    workspace = Workspace(home=root / "ts-home", model_store=root / "store")
    workspace.ensure_dirs()
    build_versions(root, workspace, args.batch_size, args.max_batch_delay)
    jpegs = load_jpegs(64)
    ts_row, ts_swap = bench_torchserve(workspace, jpegs, args)
    ray_rows, ray_swap = bench_ray(root, jpegs, args)
    print(f"\nsmall_cnn 32x32x3, 10 classes, ONNX, 1 thread per worker/replica; batch {args.batch_size}, "
          f"wait {args.max_batch_delay} ms; {args.concurrency} clients; load average at end: "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print_table([ts_row, *ray_rows])
    print(f"\n{'swap v1 -> v2 under load':<28} {'requests':>8} {'failed':>6} {'swap s':>7}  versions seen")
    for name, result in (("TorchServe", ts_swap), ("Ray Serve, 2 replicas", ray_swap)):
        print(f"{name:<28} {result['requests']:>8} {result['failed']:>6} {result['swap_s']:>7.1f}  "
              f"{', '.join(result['versions'])}")
    if args.keep:
        print(f"workspace kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
