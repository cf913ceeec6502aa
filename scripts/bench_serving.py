"""Throughput and latency of the tmu handler (ONNX and torch backends) through TorchServe, beside TorchServe's
stock ``image_classifier`` handler serving a TorchScript copy of the same weights, and raw onnxruntime without
HTTP as the limit. Loopback only, bounded request counts, one worker per model, one thread per worker.

The stock handler resizes every image to 256 and crops 224 (ImageNet preprocessing), so for a 32x32 model it is
measured twice: with the same JPEG bodies (its out-of-the-box path, running the model on 224x224 inputs), and
with JSON float lists of shape (3, 32, 32), its only way to skip the resize (same inputs, same predictions).

The stock handler imports ``captum``, which tmu-serve does not depend on; install it outside the venv, e.g.
``pip install --no-deps --target /tmp/tmu-bench-pydeps captum`` and pass ``--stock-pythonpath``.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_serving.py --requests 400 \\
        --stock-pythonpath /tmp/tmu-bench-pydeps
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from tmu_core.config import Workspace
from tmu_core.models import build_model
from tmu_core.serving.archive import package_version
from tmu_core.serving.torchserve import TorchServe, TorchServeConfig
from tmu_core.train import CheckpointMeta, save_checkpoint

CIFAR = Path("/work/shared/data/cifar10-jpeg.zip")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


@dataclass(frozen=True)
class Row:
    name: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: tuple[float, ...]

    @property
    def throughput(self) -> float:
        return (self.requests - self.errors) / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def load_jpegs(count: int) -> list[bytes]:
    """CIFAR-10 test JPEGs (32x32) when the zip is there, else synthetic ones."""
    if CIFAR.is_file():
        with zipfile.ZipFile(CIFAR) as zf:
            names = sorted(n for n in zf.namelist() if n.startswith("test/") and n.endswith(".jpg"))
            step = max(1, len(names) // count)
            return [zf.read(n) for n in names[::step][:count]]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def float_lists(jpegs: list[bytes]) -> list[bytes]:
    """The same images as JSON float lists (3, 32, 32) in [0, 1]."""
    bodies = []
    for data in jpegs:
        chw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
        bodies.append(json.dumps(np.round(chw, 4).tolist()).encode())
    return bodies


def build_archives(root: Path, workspace: Workspace, batch_size: int, delay: int) -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 3, 32, MEAN, STD).eval()
    meta = CheckpointMeta("small_cnn", 10, CLASSES, 3, 32, MEAN, STD, 0, {}, "bench", 0)
    ckpt = save_checkpoint(root / "bench.pt", model, meta)
    # One intra-op thread per worker for every setup, so no row gets more cores than another.
    common = dict(batch_size=batch_size, max_batch_delay=delay, top_k=5, threads=1)
    package_version(ckpt, workspace, "tmu_onnx", 1, backend="onnx", **common)
    package_version(ckpt, workspace, "tmu_torch", 1, backend="torch", **common)
    _stock_archive(model, root, workspace.model_store, batch_size, delay)


def _stock_archive(model: torch.nn.Module, root: Path, store: Path, batch_size: int, delay: int) -> None:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    scripted = torch.jit.trace(model, torch.rand(1, 3, 32, 32))
    stock = root / "stock"
    stock.mkdir()
    scripted.save(str(stock / "model.pt"))
    (stock / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(CLASSES)}))
    (stock / "model-config.yaml").write_text(
        f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch_size}\nmaxBatchDelay: {delay}\nresponseTimeout: 120\n")
    generate_model_archive(ModelArchiverConfig(
        model_name="stock", handler="image_classifier", version="1", serialized_file=str(stock / "model.pt"),
        extra_files=str(stock / "index_to_name.json"), config_file=str(stock / "model-config.yaml"),
        export_path=str(store)))
    (store / "stock.mar").rename(store / "stock-v1.mar")


def run_load(url: str, token: str, bodies: list[bytes], content_type: str, concurrency: int,
             total: int, warmup: int) -> tuple[int, float, list[float]]:
    """POST ``total`` requests from ``concurrency`` threads; returns (errors, seconds, latencies in ms)."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    with requests.Session() as session:
        for i in range(warmup):
            session.post(url, data=bodies[i % len(bodies)], headers=headers, timeout=60).raise_for_status()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(total))

    def worker() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                resp = session.post(url, data=bodies[i % len(bodies)], headers=headers, timeout=60)
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    latencies.append(elapsed)
                    errors[0] += resp.status_code != 200

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors[0], time.perf_counter() - start, latencies


def raw_onnxruntime(onnx_path: Path, jpegs: list[bytes], batch: int, total: int) -> Row:
    """Decode + onnxruntime (one thread) on batches of ``batch`` images, no HTTP: the ceiling."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    calls = max(1, total // batch)
    latencies = []
    start = time.perf_counter()
    for c in range(calls):
        t0 = time.perf_counter()
        picks = [jpegs[(c * batch + j) % len(jpegs)] for j in range(batch)]
        images = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in picks])
        x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255  # (N, C, H, W)
        session.run(None, {name: x})
        latencies.append((time.perf_counter() - t0) * 1000)
    return Row(f"raw onnxruntime (batch {batch})", batch, calls * batch, 0, time.perf_counter() - start,
               tuple(latencies))


def print_table(rows: list[Row]) -> None:
    header = f"{'setup':<48} {'conc':>4} {'n':>5} {'err':>4} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.name:<48} {r.concurrency:>4} {r.requests:>5} {r.errors:>4} {r.throughput:>8.1f} "
              f"{r.percentile(50):>8.2f} {r.percentile(99):>8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="Requests per setup and concurrency.")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--batch-size", type=int, default=32, help="TorchServe batchSize of every model.")
    parser.add_argument("--max-batch-delay", type=int, default=5, help="TorchServe maxBatchDelay (ms).")
    parser.add_argument("--stock-pythonpath", default=None, help="Folder with captum for the stock handler.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary workspace.")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the stock handler's torch threads in its worker
    if args.stock_pythonpath:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [args.stock_pythonpath,
                                                                 os.environ.get("PYTHONPATH")]))
    root = Path(tempfile.mkdtemp(prefix="tmu-bench-"))
    workspace = Workspace(home=root / "home", model_store=root / "store")
    workspace.model_store.mkdir(parents=True)
    build_archives(root, workspace, args.batch_size, args.max_batch_delay)
    jpegs = load_jpegs(64)
    setups = [("tmu handler, ONNX backend (JPEG)", "tmu_onnx", jpegs, "image/jpeg"),
              ("tmu handler, torch backend (JPEG)", "tmu_torch", jpegs, "image/jpeg"),
              ("stock image_classifier, TorchScript (JPEG->224)", "stock", jpegs, "image/jpeg"),
              ("stock image_classifier, TorchScript (JSON 3x32x32)", "stock", float_lists(jpegs),
               "application/json")]
    server = TorchServe(workspace, TorchServeConfig.with_free_ports(workspace.model_store))
    server.start(["tmu_onnx=tmu_onnx-v1.mar", "tmu_torch=tmu_torch-v1.mar", "stock=stock-v1.mar"])
    rows: list[Row] = []
    try:
        for model in ("tmu_onnx", "tmu_torch", "stock"):
            server.wait_ready(model, timeout=180)
        token = server.keys().inference
        for name, model, bodies, content_type in setups:
            url = f"{server.config.url('inference')}/predictions/{model}"
            for conc in args.concurrency:
                errors, seconds, lat = run_load(url, token, bodies, content_type, conc, args.requests, args.warmup)
                rows.append(Row(name, conc, args.requests, errors, seconds, tuple(lat)))
                print(f"done: {name} concurrency {conc}: {rows[-1].throughput:.1f} img/s", file=sys.stderr)
    finally:
        server.stop()
    for batch in args.concurrency:
        rows.append(raw_onnxruntime(workspace.version_dir("tmu_onnx", 1) / "model.onnx", jpegs, batch, args.requests))
    print(f"\nsmall_cnn 32x32x3, 10 classes; TorchServe batchSize={args.batch_size} maxBatchDelay={args.max_batch_delay} ms;"
          f" 1 worker/model, 1 thread/worker; load average at end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print_table(rows)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"workspace kept in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
