"""Throughput of the tmu handler on real-size photos (640x480 JPEGs), beside TorchServe's stock
``image_classifier`` handler serving the same model on the same photos. Loopback only, every loop bounded.

The model is a torchvision ResNet-18 with seeded random weights and 10 classes, preprocessed the torchvision way
(resize 256, centre crop 224, ImageNet mean/std). A random ResNet-18 gives every photo the same class, so the
weights are made to tell the photos apart without training: BatchNorm statistics from one pass over the photos
and a head bias that centres the logits; they stay fixed from there on. It is deployed first as a stock archive
(``torch-model-archiver --handler image_classifier``: model file, state_dict, ``index_to_name.json``), then
imported into a tmu workspace from that archive as users do (``import_model``, with an index of the photos as the
training split), and packaged for the tmu handler with each backend at the same batching and thread settings.

The photos: ``--photos`` distinct CIFAR-10 test images (``/work/shared/data/cifar10-jpeg.zip``, every class) upscaled
bicubically to 640x480, with seeded Gaussian grain (sigma 6) so that they compress like photos, saved as JPEG at
quality 90; without the zip, seeded smooth random images (8x8 noise upscaled) the same way.

One TorchServe holds every model with one worker each, and the models are measured one after another. For each
model and each ``--clients`` value: ``--warmup`` seconds of load (not counted), then ``--seconds`` of load from that
many threads, each with its own ``requests.Session`` sending one photo at a time. Before the load, every photo is
sent once to every model and the top-1 classes compared (with the same model run in this process through the
stock handler's own transforms as the reference).

The stock handler imports ``captum``, which tmu-serve does not depend on; install it outside the venv, e.g.
``pip install --no-deps --target /tmp/tmu-bench-pydeps captum`` and pass ``--stock-pythonpath``.

Usage::

    .venv/bin/python scripts/bench_photo_throughput.py --seconds 30 --clients 1 4 \\
        --stock-pythonpath /tmp/tmu-bench-pydeps --profile --json /tmp/photo-bench.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_support import KeyFile, Load  # the soak's duration-bounded prediction clients

CIFAR = Path("/work/shared/data/cifar10-jpeg.zip")
WIDTH, HEIGHT = 640, 480
NUM_CLASSES = 10
STOCK_MODEL_FILE = """from torchvision.models.resnet import BasicBlock, ResNet


class ImageClassifier(ResNet):
    def __init__(self):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes={classes})
"""


def make_photos(count: int, seed: int) -> tuple[list[bytes], list[str], str]:
    """``count`` distinct 640x480 JPEGs, their source classes, and where they came from."""
    rng = np.random.default_rng(seed)
    if CIFAR.is_file():
        with zipfile.ZipFile(CIFAR) as zf:
            names = sorted(n for n in zf.namelist() if n.startswith("test/") and n.endswith(".jpg"))
            picks = names[::max(1, len(names) // count)][:count]
            sources = [Image.open(io.BytesIO(zf.read(n))).convert("RGB") for n in picks]
            classes, origin = [n.split("/")[1] for n in picks], f"CIFAR-10 test images from {CIFAR.name}"
    else:
        sources = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(count)]
        classes, origin = [f"class{i % NUM_CLASSES}" for i in range(count)], "seeded smooth random images"
    photos = []
    for source in sources:
        big = np.asarray(source.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC), dtype=np.float32)
        grain = np.clip(big + rng.normal(0.0, 6.0, big.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(grain).save(buf, "JPEG", quality=90)
        photos.append(buf.getvalue())
    return photos, classes, origin


def stock_transform():
    """The stock handler's own preprocessing (``ImageClassifier.image_processing``)."""
    from ts.torch_handler.image_classifier import ImageClassifier

    return ImageClassifier.image_processing


def make_network(photos: list[bytes], num_classes: int, seed: int) -> torch.nn.Module:
    """The seeded ResNet-18, its BatchNorm statistics taken from the photos and its logits centred on them."""
    from torchvision.models import get_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = get_model("resnet18", weights=None, num_classes=num_classes)
    transform = stock_transform()
    batch = torch.stack([transform(Image.open(io.BytesIO(p))) for p in photos])
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the pass
    with torch.no_grad():
        net.train()(batch)
        head, net.fc = net.fc, torch.nn.Identity()
        features = net.eval()(batch)
        net.fc = head
        head.bias.copy_(-(head.weight @ features.mean(0)))
    return net.eval()


def build_stock_archive(folder: Path, net: torch.nn.Module, classes: list[str], store: Path,
                        batch_size: int, delay: int) -> Path:
    """``<store>/stock.mar`` for the stock ``image_classifier`` handler: model file, state_dict, class names."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / "resnet18.pt")
    (folder / "model.py").write_text(STOCK_MODEL_FILE.format(classes=len(classes)))
    (folder / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(classes)}))
    (folder / "model-config.yaml").write_text(
        f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch_size}\nmaxBatchDelay: {delay}\nresponseTimeout: 120\n")
    generate_model_archive(ModelArchiverConfig(
        model_name="stock", handler="image_classifier", version="1", model_file=str(folder / "model.py"),
        serialized_file=str(folder / "resnet18.pt"), extra_files=str(folder / "index_to_name.json"),
        config_file=str(folder / "model-config.yaml"), export_path=str(store)))
    return store / "stock.mar"


def import_and_package(workspace, root: Path, mar: Path, photos: list[bytes], photo_classes: list[str],
                       backends: list[str], batch_size: int, delay: int, threads: int) -> tuple[dict, dict]:
    """Index the photos, import the stock archive (the index's training split as its membership), and package
    the imported checkpoint once per backend. Returns the import's summary and ``{backend: archive name}``."""
    from tmu_core.index import ingest_image_folder
    from tmu_core.service.import_model import ImportSpec, import_model
    from tmu_core.serving.archive import package_version

    tree = root / "photos"
    for n, (data, name) in enumerate(zip(photos, photo_classes)):
        (tree / "train" / name).mkdir(parents=True, exist_ok=True)
        (tree / "train" / name / f"{n:04d}.jpg").write_bytes(data)
    ingest_image_folder(tree, workspace.index_dir).close()
    imported = import_model(workspace, ImportSpec(model="imported", mar=mar, batch_size=batch_size))
    archives = {}
    for backend in backends:
        package = package_version(imported.package.checkpoint, workspace, f"tmu_{backend}", 1, backend=backend,
                                  batch_size=batch_size, max_batch_delay=delay, threads=threads)
        archives[backend] = package.archive.name
    summary = {"arch": imported.arch, "head": imported.head, "preprocess": imported.preprocess,
               "trained_on": imported.trained_on, "onnx_max_abs_diff": imported.package.onnx_check.max_abs_diff}
    return summary, archives


def top1(body: Any) -> tuple[str, float]:
    """(class, probability) of the best class in a tmu or a stock answer."""
    if isinstance(body, dict) and "predictions" in body:
        best = body["predictions"][0]
        return best["class"], float(best["probability"])
    name, prob = max(body.items(), key=lambda kv: kv[1])  # stock: {class: probability} of the top 5
    return name, float(prob)


def check_agreement(url: str, token: str, models: list[str], photos: list[bytes], net: torch.nn.Module,
                    classes: list[str]) -> dict:
    """Every photo once to every model; top-1 against the stock model's and against this process's reference."""
    transform = stock_transform()
    with torch.inference_mode():
        logits = net(torch.stack([transform(Image.open(io.BytesIO(p))) for p in photos]))
    probs = logits.softmax(1)
    reference = [classes[i] for i in probs.argmax(1).tolist()]
    ordered = probs.sort(1, descending=True).values
    answers: dict[str, list[tuple[str, float]]] = {}
    with requests.Session() as session:
        for model in models:
            answers[model] = []
            for data in photos:
                resp = session.post(f"{url}/predictions/{model}", data=data, timeout=60,
                                    headers={"Authorization": f"Bearer {token}",
                                             "Content-Type": "application/octet-stream"})
                resp.raise_for_status()
                answers[model].append(top1(resp.json()))
    result = {"photos": len(photos), "distinct_top1": len(set(reference)),
              "min_top1_margin": float((ordered[:, 0] - ordered[:, 1]).min()), "models": {}}
    for model in models:
        got = answers[model]
        result["models"][model] = {
            "agree_with_stock": sum(g[0] == s[0] for g, s in zip(got, answers["stock"])),
            "agree_with_reference": sum(g[0] == r for g, r in zip(got, reference)),
            "max_top1_prob_diff_vs_stock": max(abs(g[1] - s[1]) for g, s in zip(got, answers["stock"]))}
    return result


def run_load(url: str, keys: KeyFile, model: str, photos: list[bytes], clients: int, seconds: float) -> tuple[Load, float]:
    """``clients`` threads sending photos for ``seconds``; returns the finished load and its wall time."""
    load = Load(url, keys, [model], photos, clients)
    start = time.perf_counter()
    load.start()
    time.sleep(seconds)
    load.join()  # each client finishes the request in flight (30 s timeout) and stops
    return load, time.perf_counter() - start


def measure(url: str, keys: KeyFile, model: str, photos: list[bytes], clients: int, seconds: float,
            warmup: float) -> dict:
    """Warm-up load (not counted), then ``seconds`` of load from ``clients`` threads."""
    run_load(url, keys, model, photos, clients, warmup)
    load, elapsed = run_load(url, keys, model, photos, clients, seconds)
    done = np.concatenate([np.frombuffer(t.ok_done) for t in load.tallies])
    sent = np.concatenate([np.frombuffer(t.ok_sent) for t in load.tallies])
    latency = (done - sent) * 1000 if len(done) else np.full(1, np.nan)
    failures = load.failures()
    return {"clients": clients, "requests": len(done) + len(failures), "failed": len(failures),
            "seconds": elapsed, "req_per_s": len(done) / elapsed, "p50_ms": float(np.percentile(latency, 50)),
            "p95_ms": float(np.percentile(latency, 95)), "p99_ms": float(np.percentile(latency, 99)),
            "failures": sorted({f[3] for f in failures})[:5]}


def _best_ms(fn, items: list, rounds: int = 3) -> float:
    """Best of ``rounds`` passes over ``items``: milliseconds a call."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - start) * 1000 / len(items))
    return best


def profile(photos: list[bytes], net: torch.nn.Module, version_dir: Path, batch_size: int, threads: int) -> dict:
    """Milliseconds a photo for each step, in this process, at the workers' thread count: decode, preprocess,
    inference (a batch of ``batch_size``, divided by it)."""
    from tmu_core.preprocess import Preprocess
    from tmu_core.serving.decode import ImageSpec, decode_image_bytes
    from tmu_core.serving.inference import OnnxPredictor, TorchPredictor
    from tmu_core.train import load_checkpoint

    model, meta = load_checkpoint(version_dir / "checkpoint.pt", "cpu")
    spec = ImageSpec(Preprocess.from_meta(meta))
    transform = stock_transform()
    decoded = [Image.open(io.BytesIO(p)).convert("RGB") for p in photos]
    tmu_batch = torch.stack([decode_image_bytes(p, spec, "photo") for p in photos[:batch_size]])
    stock_batch = torch.stack([transform(image) for image in decoded[:batch_size]])
    onnx = OnnxPredictor(version_dir / "model.onnx", threads=threads)
    eager = TorchPredictor(model, torch.device("cpu"))

    def stock_forward(x: torch.Tensor) -> None:
        with torch.inference_mode():
            net(x)

    batches = range(8)
    return {
        "decode (PIL open + load)": _best_ms(lambda p: Image.open(io.BytesIO(p)).load(), photos),
        "tmu decode + preprocess (decode_image_bytes)": _best_ms(
            lambda p: decode_image_bytes(p, spec, "photo"), photos),
        "stock decode + preprocess (image_processing)": _best_ms(
            lambda p: transform(Image.open(io.BytesIO(p))), photos),
        "tmu preprocess of a decoded photo (Preprocess.apply)": _best_ms(spec.preprocess.apply, decoded),
        "stock preprocess of a decoded photo (image_processing)": _best_ms(transform, decoded),
        "tmu onnx inference": _best_ms(lambda _: onnx.logits(tmu_batch), batches) / batch_size,
        "tmu torch inference": _best_ms(lambda _: eager.logits(tmu_batch), batches) / batch_size,
        "stock torch inference": _best_ms(lambda _: stock_forward(stock_batch), batches) / batch_size}


def print_table(rows: list[dict]) -> None:
    header = (f"{'handler':<22} {'backend':<14} {'clients':>7} {'requests':>8} {'failed':>6} {'req/s':>7} "
              f"{'p50 ms':>7} {'p95 ms':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['handler']:<22} {r['backend']:<14} {r['clients']:>7} {r['requests']:>8} {r['failed']:>6} "
              f"{r['req_per_s']:>7.1f} {r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=64, help="Distinct 640x480 JPEGs.")
    parser.add_argument("--seconds", type=float, default=30.0, help="Counted load per model and client count.")
    parser.add_argument("--warmup", type=float, default=5.0, help="Load before each counted one (not counted).")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="Concurrent client threads.")
    parser.add_argument("--backends", nargs="+", choices=["onnx", "torch"], default=["onnx", "torch"])
    parser.add_argument("--batch-size", type=int, default=4, help="TorchServe batchSize of every model.")
    parser.add_argument("--max-batch-delay", type=int, default=5, help="TorchServe maxBatchDelay (ms).")
    parser.add_argument("--threads", type=int, default=1,
                        help="Intra-op threads of every worker (OMP_NUM_THREADS, and the tmu handler's threads).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="Also time decode, preprocess and inference.")
    parser.add_argument("--stock-pythonpath", default=None, help="Folder with captum for the stock handler.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary workspace.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every TorchServe worker
    torch.set_num_threads(args.threads)
    if args.stock_pythonpath:
        sys.path.insert(0, args.stock_pythonpath)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [args.stock_pythonpath,
                                                                 os.environ.get("PYTHONPATH")]))
    from tmu_core.config import Workspace
    from tmu_core.serving.torchserve import TorchServe, TorchServeConfig

    root = Path(tempfile.mkdtemp(prefix="tmu-photo-"))
    workspace = Workspace(home=root / "home", model_store=root / "store")
    workspace.model_store.mkdir(parents=True)
    result: dict[str, Any] = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count(),
                              "settings": {k: v for k, v in vars(args).items() if k not in ("json",)}}
    try:
        photos, photo_classes, origin = make_photos(args.photos, args.seed)
        classes = sorted(set(photo_classes))
        result["photos"] = {"count": len(photos), "size": f"{WIDTH}x{HEIGHT}", "source": origin,
                            "mean_bytes": int(np.mean([len(p) for p in photos]))}
        print(f"photos: {len(photos)} x {WIDTH}x{HEIGHT} JPEG from {origin}, mean "
              f"{result['photos']['mean_bytes']:,} bytes", file=sys.stderr)
        net = make_network(photos, len(classes), args.seed)
        mar = build_stock_archive(root / "stock", net, classes, workspace.model_store, args.batch_size,
                                  args.max_batch_delay)
        result["import"], archives = import_and_package(
            workspace, root, mar, photos, photo_classes, args.backends, args.batch_size, args.max_batch_delay,
            args.threads)
        setups = [("tmu", backend, f"tmu_{backend}") for backend in args.backends]
        setups.append(("stock image_classifier", "torch (eager)", "stock"))
        server = TorchServe(workspace, TorchServeConfig.with_free_ports(workspace.model_store))
        rows = []
        try:
            server.start([f"stock={mar.name}", *(f"tmu_{b}={a}" for b, a in archives.items())], timeout=120)
            for _, _, model in setups:
                server.wait_ready(model, timeout=300)
            url, keys = server.config.url("inference"), KeyFile(server.key_file)
            result["agreement"] = check_agreement(url, keys.key, [m for _, _, m in setups], photos, net, classes)
            print(f"agreement: {json.dumps(result['agreement'])}", file=sys.stderr)
            result["load_average_before_load"] = os.getloadavg()
            for handler, backend, model in setups:
                for clients in args.clients:
                    row = {"handler": handler, "backend": backend, "model": model,
                           **measure(url, keys, model, photos, clients, args.seconds, args.warmup),
                           "load_average": os.getloadavg()}
                    rows.append(row)
                    print(f"done: {model} clients {clients}: {row['req_per_s']:.1f} req/s, "
                          f"{row['failed']} failed, load {row['load_average'][0]:.2f}", file=sys.stderr)
        finally:
            server.stop()
        result["rows"], result["load_average_end"] = rows, os.getloadavg()
        if args.profile:
            result["profile_ms_per_photo"] = profile(photos, net, workspace.version_dir("imported", 1),
                                                     args.batch_size, args.threads)
    finally:
        if args.keep:
            print(f"workspace kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nResNet-18 (random, seeded), 10 classes, 224x224 from {WIDTH}x{HEIGHT} JPEGs; TorchServe "
          f"batchSize={args.batch_size} maxBatchDelay={args.max_batch_delay} ms, 1 worker a model, "
          f"{args.threads} thread(s) a worker; {args.seconds:.0f} s a row after {args.warmup:.0f} s warm-up")
    print_table(result["rows"])
    agreement = result["agreement"]
    for model, scores in agreement["models"].items():
        if model == "stock":
            continue
        print(f"top-1 {model}: {scores['agree_with_stock']}/{agreement['photos']} agree with stock, "
              f"{scores['agree_with_reference']}/{agreement['photos']} with the in-process reference, "
              f"max top-1 probability difference vs stock {scores['max_top1_prob_diff_vs_stock']:.2e}")
    print(f"({agreement['distinct_top1']} distinct top-1 classes; smallest top-1 margin "
          f"{agreement['min_top1_margin']:.2e})")
    for name, value in result.get("profile_ms_per_photo", {}).items():
        print(f"profile, ms a photo: {name}: {value:.2f}")
    print("load average: start {:.2f}, before load {:.2f}, end {:.2f} on {} CPUs".format(
        result["load_average_start"][0], result["load_average_before_load"][0], result["load_average_end"][0],
        result["cpus"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if all(r["failed"] == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
