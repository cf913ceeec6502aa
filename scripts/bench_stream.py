"""Benchmark: a stream of small owner-shaped forget requests through the running service, each served version
scored against a gold model retrained without everything forgotten so far (how far TMU drifts, and whether a
drift budget's exact retrains bring it back).

The setting is the CIFAR-10 quickstart (``tmu-admin quickstart --data ZIP --train-per-class 500
--forget-samples 100 --epochs 24``): v1 trained on 5,000 images, then 100 random samples forgotten (v2). Its
workspace is built once through ``run_quickstart`` and kept as a snapshot under ``--work``; each run serves a
fresh copy of it. Then, through the real stack (``tmu-admin serve start``: TorchServe, the management extension
and its job workers, all on loopback):

1. ``tmu-admin prepare quickstart``, then one request: the single prepared request's time (k = 1);
2. ``--requests`` more requests back to back (the next one right after the previous one is serving).

Request k forgets one "data owner": 1-20 training samples (``--owner-sizes``; a truncated geometric spread,
``--owner-p``), drawn at random (so spread over classes) from those not forgotten yet; the sequence is fixed by
``--seed``. It goes through ``POST /forget/quickstart`` and the script waits for its job. Right after each
request the served version (the registry's ``serving``) is copied aside, its kind (``exact`` or ``approximate``,
when the service reports one) noted, and the first test image of each class is predicted through TorchServe
(the answers must be the copy's, from the version's number). Once the service is stopped, each copy is scored on the pipeline's eval split (``plan_data``, twin fraction 0.5, seed 0) against the
gold of k: a model trained with the original checkpoint's recipe (``meta.recipe``) on the training set minus the
union of everything forgotten up to k, the quickstart's 100 included. Scores: the accuracy of both on the eval
split (the service's own drift measure), the absolute gap in accuracy on that union (Delta), and the
loss-threshold attack's success on the union (``measure``, as a forget job's report uses it); also the accuracy
of both on the 9,500 test images no model sees ("unseen": the test split less TMU's twin half, the eval split's
500 among them), and each served copy's accuracy on that twin half (its guard's images are among them). Every image is read from a reference index the script builds in ``--work`` from the
zip: the service wipes forgotten samples' pixels from its own index.

Golds are cached under ``--work/golds`` by a hash of their training ids and recipe, so runs with and without a
drift budget share them; ``--phase golds`` trains them all before any service runs (the sequence is fixed
by the seed; each gold costs what the quickstart's training does, 70 s on 2 idle CPU cores, several minutes on
busy ones). ``--phase score`` scores a run again (``runs/<label>/stream.json``, saved after every request, so a
run cut short can be scored too); with ``--missing-golds skip`` a row without a cached gold keeps only the served
version's scores. ``--drift-budget``, ``--retrain-after-forgets`` and ``--retrain-after`` (and any
``--serve-arg``) are passed to ``tmu-admin serve start`` only when given (its defaults: budget 1.0,
``--drift-hold 2.0``, ``--drift-confidence 0.95``). Each request's row keeps the cost its job recorded (with its
paired error) and the retrain it found due. At the end the script waits (bounded) until no job is queued or
running, scores the version then serving, counts the exact versions that landed, and stops the stack (also on an
error or Ctrl-C).

The default phase ``all`` runs build, golds, stream and score in turn. ``--phase replay`` (then scored) applies the
same sequence with the library alone, as a forget job does (the state prepared for the serving version, then
updated from the parent's for each next one; ``unlearn``; its result the next request's model), with TMU options
from ``--tmu KEY=VALUE``: a fast comparison of options on the same golds, with no service timings. Examples (the drift budget off, then on)::

    OMP_NUM_THREADS=2 python scripts/bench_stream.py --work /tmp/bench-stream --phase golds
    OMP_NUM_THREADS=2 python scripts/bench_stream.py --work /tmp/bench-stream --json off.json
    OMP_NUM_THREADS=2 python scripts/bench_stream.py --work /tmp/bench-stream --drift-budget 1.0 --json on.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import DEFAULT_ZIP, Clock  # noqa: E402
from soak_chaos import _interrupt, run_cli  # noqa: E402  (SIGTERM as Ctrl-C; tmu-admin, output captured)
from soak_support import stop_leftovers  # noqa: E402

from tmu_core.service.quickstart import MODEL, QuickstartConfig  # noqa: E402

PHASES = ("build", "golds", "stream", "score")
OFFLINE = "replay"  # not in "all": the library instead of the service, for comparing method options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Phases: build (the quickstart snapshot and the reference index), golds "
                                            "(every gold model of the sequence), stream (the service run), score "
                                            "(a run's versions against the golds; alone, it scores the run of "
                                            "--label or of the flags again). all: every phase in turn.")
    parser.add_argument("--data", type=Path, default=DEFAULT_ZIP, help="CIFAR-10 ImageFolder zip")
    parser.add_argument("--work", type=Path, required=True,
                        help="folder for the cached workspace snapshot, reference index, golds and runs")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=QuickstartConfig.test_per_class,
                        help="held-out images per class (the quickstart's default); half are TMU's twin images, "
                             "half the eval split that measures each version's drift")
    parser.add_argument("--epochs", type=int, default=24, help="epochs of the original model (the golds' recipe)")
    parser.add_argument("--forget-samples", type=int, default=100, help="the quickstart's own first request")
    parser.add_argument("--requests", type=int, default=20,
                        help="requests in the back-to-back stream, after the single prepared one")
    parser.add_argument("--owner-sizes", default="1-20", help="MIN-MAX training samples of an owner")
    parser.add_argument("--owner-p", type=float, default=0.15,
                        help="an owner's size is MIN + a geometric draw of this success rate, cut at MAX")
    parser.add_argument("--seed", type=int, default=0, help="seeds the quickstart and the request sequence")
    parser.add_argument("--device", default="auto", help="where the quickstart, the golds and the scores run")
    parser.add_argument("--phase", choices=(*PHASES, OFFLINE, "all"), default="all")
    parser.add_argument("--tmu", action="append", default=[], metavar="KEY=VALUE",
                        help="replay: a TMU option (value parsed as JSON when it can be; repeatable)")
    parser.add_argument("--label", default=None, help="the run's folder under --work/runs (default: from the flags)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and the summary here")
    parser.add_argument("--drift-budget", default=None,
                        help="passed to `serve start` when given: ACC_Dtest points a model may lose, or off")
    parser.add_argument("--retrain-after-forgets", default=None, help="passed to `serve start` when given")
    parser.add_argument("--retrain-after", default=None, help="passed to `serve start` when given (a duration)")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="one more argument for `tmu-admin serve start` (repeatable)")
    parser.add_argument("--missing-golds", choices=("train", "skip"), default="train",
                        help="when scoring: train a gold missing from the cache, or score that row without one")
    parser.add_argument("--job-timeout", type=float, default=1800.0, help="seconds a request's job may take")
    parser.add_argument("--drain-timeout", type=float, default=1800.0,
                        help="seconds to wait at the end for queued and running jobs (background retrains)")
    args = parser.parse_args(argv)
    low, _, high = args.owner_sizes.partition("-")
    args.size_range = (int(low), int(high or low))
    if not 1 <= args.size_range[0] <= args.size_range[1]:
        parser.error(f"--owner-sizes {args.owner_sizes}: give MIN-MAX with 1 <= MIN <= MAX")
    return args


def serve_args(args: argparse.Namespace) -> list[str]:
    """The extra arguments of ``tmu-admin serve start``: the budget flags that were given, then ``--serve-arg``."""
    extra = []
    for flag in ("drift_budget", "retrain_after_forgets", "retrain_after"):
        if getattr(args, flag) is not None:
            extra += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return extra + list(args.serve_arg)


def _paths(args: argparse.Namespace) -> dict[str, Path]:
    work = args.work.absolute()
    return {"folder": work / "quickstart", "base": work / "quickstart-base", "reference": work / "reference-index",
            "golds": work / "golds", "build": work / "build.json", "runs": work / "runs", "wide": work / "wide-index"}


def _workspace(folder: Path) -> Any:
    from tmu_core.config import Workspace

    return Workspace(home=folder / ".tmu", model_store=folder / "model_store")


def _quickstart_config(args: argparse.Namespace, folder: Path) -> Any:
    return QuickstartConfig(folder=folder, data=args.data, train_per_class=args.train_per_class,
                            test_per_class=args.test_per_class, forget_samples=args.forget_samples, epochs=args.epochs,
                            device=args.device, overwrite=True, seed=args.seed)


def _build_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"data": str(args.data.absolute()), "train_per_class": args.train_per_class, "epochs": args.epochs,
            "forget_samples": args.forget_samples, "seed": args.seed, "test_per_class": args.test_per_class}


def reference_index(args: argparse.Namespace) -> Any:
    """The script's own copy of every image: the zip's subset indexed under ``--work``, never served."""
    from tmu_core.index import TrainingIndex, ingest_zip

    path = _paths(args)["reference"]
    if (path / "index.sqlite").is_file():
        return TrainingIndex.open(path)
    return ingest_zip(args.data, path, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                      overwrite=True)


def wide_test_set(args: argparse.Namespace, reference: Any, view_of: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every test image of the zip that no model or method sees (the reference's twin half left out): about
    9,500 images, so that a 2-point band around a gold is not mostly the sampling noise of the 500-image eval
    split. Indexed once under ``--work``; the same ``"<split>/<class>/<stem>"`` ids as the quickstart's index."""
    from tmu_core.evaluate.cache import open_test_index
    from tmu_core.forget.artifacts import plan_data

    with open_test_index(args.data, _paths(args)["wide"]) as wide:
        twin = set(plan_data(reference, 0.5, 0).twin_ids)
        ids = [sample for sample in wide.ids("test") if sample not in twin]
        return view_of(wide).load(ids), wide.labels(ids)


def _accuracy(model: Any, images: torch.Tensor, labels: torch.Tensor, device: Any) -> float:
    from tmu_core.unlearn.common import correct_of

    return 100.0 * correct_of(model, images, labels, device).float().mean().item()


def phase_build(args: argparse.Namespace) -> dict[str, Any]:
    """Run the quickstart once (index, train v1, serve, prepare, forget its 100) and keep its folder as the base.

    A base built with other settings is rebuilt. Returns the build record (``build.json``).
    """
    from tmu_core.service.quickstart import run_quickstart
    from tmu_core.state.versions import VersionRegistry

    paths = _paths(args)
    settings = _build_settings(args)
    if paths["build"].is_file() and paths["base"].is_dir():
        built = json.loads(paths["build"].read_text())
        if {"test_per_class": 100, **built["settings"]} == settings:  # bases built before the flag held out 100
            return built
    paths["build"].unlink(missing_ok=True)
    shutil.rmtree(paths["base"], ignore_errors=True)
    clock = Clock()
    result = run_quickstart(_quickstart_config(args, paths["folder"]),
                            say=lambda line: print(f"quickstart: {line}", file=sys.stderr, flush=True))
    seconds, _ = clock.read()
    workspace = _workspace(paths["folder"])
    registry = VersionRegistry(workspace.state_db)
    serving = registry.serving(MODEL)
    with reference_index(args) as reference:
        train_ids = set(reference.ids("train"))
        expected = set(_first_request(args, reference))
    members, forgotten = registry.members(MODEL, serving.version), registry.forgotten(MODEL)
    if forgotten != expected or members | forgotten != train_ids:
        raise SystemExit(f"the reference index does not match the quickstart's: {len(train_ids)} training ids, "
                         f"{len(members or ())} members + {len(forgotten)} forgotten ({len(expected)} expected)")
    shutil.copytree(paths["folder"], paths["base"], symlinks=True)
    built = {"settings": settings, "serving_version": serving.version, "quickstart_s": round(seconds, 1),
             "quickstart_report": result.report.get("metrics"),
             "quickstart_timings": result.report.get("timings"), "checkpoint": str(serving.checkpoint)}
    paths["build"].write_text(json.dumps(built, indent=2))
    return built


def _first_request(args: argparse.Namespace, reference: Any) -> list[str]:
    """The quickstart's own forget request (its seeded draw of ``--forget-samples`` training ids)."""
    from tmu_core.service import quickstart

    return quickstart._forget_request(reference, _quickstart_config(args, _paths(args)["folder"]))["sample_ids"]


def owner_sizes(rng: random.Random, count: int, low: int, high: int, p: float) -> list[int]:
    """``count`` owner sizes in [low, high]: ``low`` + a geometric draw (success rate ``p``), cut at ``high``."""
    sizes = list(range(low, high + 1))
    weights = [(1 - p) ** (s - low) for s in sizes]
    return rng.choices(sizes, weights=weights, k=count)


def request_sequence(args: argparse.Namespace, reference: Any) -> list[list[str]]:
    """Request 0 (the quickstart's), 1 (the single prepared one) and the stream's: each a sorted list of ids.

    Each owner's samples are a seeded random draw from the training ids not forgotten yet, so they spread over
    the classes."""
    rng = random.Random(args.seed)
    first = _first_request(args, reference)
    left = sorted(set(reference.ids("train")) - set(first))
    requests = [sorted(first)]
    for _ in range(args.requests + 1):  # one draw after the other: a longer stream starts as a shorter one
        chosen = rng.sample(left, owner_sizes(rng, 1, *args.size_range, args.owner_p)[0])
        requests.append(sorted(chosen))
        left = sorted(set(left) - set(chosen))
    return requests


def unions(requests: list[list[str]]) -> list[list[str]]:
    """The samples forgotten up to each request, sorted."""
    seen: set[str] = set()
    out = []
    for ids in requests:
        seen |= set(ids)
        out.append(sorted(seen))
    return out


def _recipe_meta(args: argparse.Namespace) -> Any:
    """The checkpoint metadata of the base's serving version (its ``recipe`` leads back to v1's training)."""
    from tmu_core.train import load_checkpoint

    built = json.loads(_paths(args)["build"].read_text())
    checkpoint = Path(built["checkpoint"].replace(str(_paths(args)["folder"]), str(_paths(args)["base"])))
    return load_checkpoint(checkpoint, "cpu")[1]


def gold_path(args: argparse.Namespace, train_ids: list[str], meta: Any) -> Path:
    """Where the gold trained on ``train_ids`` with ``meta``'s recipe is cached."""
    from tmu_core.unlearn.baselines import recipe_config

    recipe = {"arch": meta.arch, "recipe": asdict(recipe_config(meta)), "ids": sorted(train_ids)}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return _paths(args)["golds"] / f"{digest}.pt"


def gold(args: argparse.Namespace, reference: Any, forgotten: list[str], meta: Any, train: bool = True) -> Path | None:
    """The gold without ``forgotten``: trained now (the ``retrain`` method, the recipe's seed) unless cached; None
    when it is not cached and ``train`` is off. One process at a time trains a gold (a lock beside it), so a golds
    phase and a scoring run side by side never train the same one twice."""
    from tmu_core.forget.artifacts import artifacts_lock

    gone = set(forgotten)
    retain = tuple(i for i in reference.ids("train") if i not in gone)
    path = gold_path(args, list(retain), meta)
    if path.is_file() or not train:
        return path if path.is_file() else None
    with artifacts_lock(path.parent / "locks" / path.stem):
        if not path.is_file():
            _train_gold(args, reference, gone, retain, meta, path)
    return path


def _train_gold(args: argparse.Namespace, reference: Any, gone: set[str], retain: tuple[str, ...], meta: Any,
                path: Path) -> None:
    from tmu_core.device import resolve_device
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import save_checkpoint
    from tmu_core.unlearn import UnlearnData, get_method

    data = UnlearnData(reference.view(Preprocess.from_meta(meta)), tuple(sorted(gone)), retain)
    clock = Clock()
    outcome = get_method("retrain").unlearn(None, meta, data, resolve_device(args.device))
    seconds, cpu = clock.read()
    fresh = outcome.model.cpu()
    gold_meta = replace(meta, mean=tuple(fresh.mean.flatten().tolist()), std=tuple(fresh.std.flatten().tolist()),
                        train_size=len(retain), index_fingerprint=reference.fingerprint(list(retain)),
                        parent=None)
    save_checkpoint(path, fresh, gold_meta)
    path.with_suffix(".json").write_text(json.dumps({"train_size": len(retain), "forgotten": len(gone),
                                                     "seconds": round(seconds, 1), "cpu_s": round(cpu, 1),
                                                     **outcome.details}))
    print(f"gold without {len(gone)} samples: {seconds:.0f}s ({path.name})", file=sys.stderr, flush=True)


def phase_golds(args: argparse.Namespace) -> None:
    meta = _recipe_meta(args)
    with reference_index(args) as reference:
        for k, forgotten in enumerate(unions(request_sequence(args, reference))):
            print(f"gold k={k}: {gold(args, reference, forgotten, meta).name}", file=sys.stderr, flush=True)


def run_label(args: argparse.Namespace) -> str:
    """A run's folder name under ``runs``: ``budget-off``, or its ``serve start`` arguments."""
    extra = "_".join(a.lstrip("-") for a in serve_args(args))
    return f"args_{extra}" if extra else "budget-off"


class Run:
    """One service run on a fresh copy of the base workspace: its config, the stack's clients, the copies."""

    def __init__(self, args: argparse.Namespace) -> None:
        from tmu_core.serving import TorchServeConfig

        paths = _paths(args)
        self.label = args.label or run_label(args)
        self.folder, self.dir = paths["folder"], paths["runs"] / self.label
        shutil.rmtree(self.folder, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.copytree(paths["base"], self.folder, symlinks=True)
        (self.dir / "served").mkdir(parents=True)
        self.workspace = _workspace(self.folder)
        self.config = TorchServeConfig.with_free_ports(self.workspace.model_store)
        self.config_path = self.config.write(self.dir / "config.properties")
        self.client: Any = None

    def start(self, extra: list[str]) -> dict[str, Any]:
        """``tmu-admin serve start`` with the run's ports and ``--retention 0s`` (the quickstart's), plus ``extra``."""
        from tmu_core.service.client import ExtensionClient

        done = run_cli(self.workspace, "serve", "start", "--config", str(self.config_path), "--retention", "0s",
                       *extra, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"tmu-admin serve start failed: {done.stdout[-400:]} {done.stderr[-1500:]}")
        self.client = ExtensionClient.from_workspace(self.workspace)
        return json.loads(done.stdout)

    def stop(self) -> None:
        done = run_cli(self.workspace, "serve", "stop", timeout=180)
        print((done.stdout + done.stderr).strip(), file=sys.stderr)
        leftovers = stop_leftovers(self.folder)
        if leftovers:
            print(f"stopped leftover processes {leftovers}", file=sys.stderr)

    def serving(self) -> dict[str, Any]:
        """The registry's serving version, its kind (when reported) and a copy of its checkpoint."""
        from tmu_core.state.versions import VersionRegistry

        record = VersionRegistry(self.workspace.state_db).serving(MODEL)
        copy = self.dir / "served" / f"v{record.version}.pt"
        if not copy.is_file():
            shutil.copyfile(record.checkpoint, copy)
        listed = {v["version"]: v for v in self.client.versions(MODEL)["versions"]}
        return {"version": record.version, "kind": listed.get(record.version, {}).get("kind"),
                "checkpoint": str(copy)}

    def predict(self, images: list[bytes]) -> dict[str, Any]:
        """Predictions through TorchServe: the version that answered each image and its top class."""
        from tmu_core.serving import TorchServe

        client = TorchServe(self.workspace, self.config).inference()
        answers = [client.predict(MODEL, image) for image in images]
        return {"model_version": [a.model_version for a in answers], "tops": [a.predictions[0].index for a in answers]}

    def forget(self, k: int, ids: list[str], seed: int, timeout: float) -> dict[str, Any]:
        """``POST /forget/quickstart`` for ``ids``; waits for its job(s) and the request; the job's timings."""
        started = time.time()
        accepted = self.client.forget(MODEL, sample_ids=ids, idempotency_key=f"bench-stream-{seed}-{k}")
        if accepted.get("request_id") is None:
            raise SystemExit(f"request {k}: nothing to do: {accepted}")
        jobs = [self.client.wait(entry["job_id"], timeout=timeout) for entry in accepted["jobs"]]
        view = self.client.wait_request(accepted["request_id"], timeout=timeout)
        waited = time.time() - started
        failed = [j for j in jobs if j["state"] != "succeeded"]
        if failed or view["state"] != "succeeded":
            raise SystemExit(f"request {k} {view['state']}: {[(j['id'], j.get('reason')) for j in failed]}")
        job = jobs[0]
        timings = (job.get("result") or {}).get("timings", {})
        forgetting = (job.get("result") or {}).get("forgetting") or {}
        return {"job": job["id"], "to_version": job.get("to_version"), "wait_s": round(waited, 2),
                "request_to_serving_s": timings.get("request_to_serving"),
                "prepare_artifacts_s": timings.get("prepare_artifacts"), "unlearn_s": timings.get("unlearn"),
                "queue_wait_s": timings.get("queue_wait"),
                "job_acc_test": ((job.get("result") or {}).get("metrics") or {}).get("acc_test_after"),
                "job_drift": {k: (forgetting.get("drift") or {}).get(k) for k in ("cost", "cost_se", "forgets")},
                "retrain_due": (forgetting.get("retrain") or {}).get("due"),
                "followup_at_next": (job.get("followup") or {}).get("artifacts")}  # the new version's preparation

    def drain(self, timeout: float) -> float:
        """Wait until no job of the model is queued or running (background retrains); seconds waited."""
        started = time.time()
        while time.time() - started < timeout:
            busy = [j for state in ("queued", "running") for j in self.client.jobs(model=MODEL, state=state)]
            if not busy:
                return round(time.time() - started, 1)
            time.sleep(2.0)
        raise SystemExit(f"jobs still queued or running after {timeout:.0f}s: "
                         f"{[(j['id'], j['state'], j.get('step')) for j in busy]}")

    def save(self, result: dict[str, Any]) -> None:
        (self.dir / "stream.json").write_text(json.dumps(result, indent=2, default=str))

    def version_kinds(self) -> dict[str, Any]:
        body = self.client.versions(MODEL)
        return {"versions": [{k: v.get(k) for k in ("version", "state", "kind", "parent", "forget_request")}
                             for v in body["versions"]]}


def stream(args: argparse.Namespace, run: Run, result: dict[str, Any], probes: list[bytes]) -> None:
    """Prepare, the single request, then the back-to-back stream: one record per request in ``result["rows"]``
    (no scoring yet), saved after each request so that a run cut short can still be scored."""
    base = json.loads(_paths(args)["build"].read_text())["serving_version"]
    requests, rows = result["requests"], result["rows"]
    result["serve_start"] = started = run.start(serve_args(args))
    print(f"serving {started['models']} (started {started['started']})", file=sys.stderr, flush=True)
    rows.append({"k": 0, "owner_size": len(requests[0]), **run.serving(), "live": run.predict(probes)})
    clock = Clock()
    prepared = run_cli(run.workspace, "prepare", MODEL, timeout=900)
    if prepared.returncode != 0:
        raise SystemExit(f"tmu-admin prepare failed: {prepared.stderr[-800:]}")
    result["prepare_s"] = round(clock.read()[0], 1)
    print(f"prepared v{base}: {result['prepare_s']}s", file=sys.stderr, flush=True)
    for k, ids in enumerate(requests[1:], start=1):
        job = run.forget(k, ids, args.seed, args.job_timeout)
        row = {"k": k, "owner_size": len(ids), **job, **run.serving(), "live": run.predict(probes)}
        rows.append(row)
        run.save(result)
        print(f"request {k}: {len(ids)} samples -> v{row['version']} ({row['kind'] or '-'}) in "
              f"{row['request_to_serving_s']}s (waited {row['wait_s']}s, its preparation "
              f"{row['prepare_artifacts_s']}s)", file=sys.stderr, flush=True)
    result["drain_s"] = run.drain(args.drain_timeout)
    final = run.serving()
    if final["version"] != rows[-1]["version"]:
        result["end"] = {"k": "end", "owner_size": 0, **final, "live": run.predict(probes)}
    result["versions"] = run.version_kinds()["versions"]
    result["exact_versions"] = [v["version"] for v in result["versions"]
                                if v.get("kind") == "exact" and v["version"] > base]
    result["complete"] = True


def score(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Fill each row's scores: the served copy and the gold of its k, on D_test and the union forgotten so far.

    A gold missing from the cache is trained first, unless ``--missing-golds skip``: then the row has only the
    served model's scores."""
    from tmu_core.device import resolve_device
    from tmu_core.forget.artifacts import plan_data
    from tmu_core.forget.report import measure
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import load_checkpoint, predict_logits

    device = resolve_device(args.device)
    meta = _recipe_meta(args)
    requests = result["requests"]
    forgotten = unions(requests)
    with reference_index(args) as reference:
        view = reference.view(Preprocess.from_meta(meta))
        plan = plan_data(reference, 0.5, 0)
        eval_ids = list(plan.eval_ids)
        test = (view.load(eval_ids), reference.labels(eval_ids))
        wide = wide_test_set(args, reference, lambda index: index.view(Preprocess.from_meta(meta)))
        twin_ids = list(plan.twin_ids)  # TMU's held-out half: its guard images among them
        twin = (view.load(twin_ids), reference.labels(twin_ids))
        probe_ids = result.get("probe_ids") or [result.get("probe_id")]
        probes = view.load(probe_ids) if probe_ids[0] is not None else None
        for row in result["rows"] + ([result["end"]] if result["end"] else []):
            union = forgotten[len(requests) - 1 if row["k"] == "end" else row["k"]]
            served, _ = load_checkpoint(row["checkpoint"], device)
            path = gold(args, reference, union, meta, train=args.missing_golds == "train")
            reference_model = load_checkpoint(path, device)[0] if path else served
            m = measure(reference_model, served, (view.load(union), reference.labels(union)), test, device, None)
            live_ok = None
            if "live" in row:  # a service run: TorchServe's answers must be the copy's
                local = predict_logits(served, probes, device).argmax(1).tolist()
                answered = row["live"].get("tops") or [row["live"].get("top")]
                versions = row["live"]["model_version"]
                versions = [versions] if isinstance(versions, str) else versions
                live_ok = versions == [str(row["version"])] * len(answered) and answered == local
            row.update({"union": len(union), "acc_test": m.acc_test_after, "acc_union": m.acc_forget_after,
                        "asr": m.asr_after, "test_size": m.test_size, "gold": path.name if path else None,
                        "acc_test_gold": None, "acc_union_gold": None, "delta_union": None, "asr_gold": None,
                        "acc_wide": _accuracy(served, *wide, device), "wide_size": int(wide[1].numel()),
                        "acc_wide_gold": None, "acc_twin": _accuracy(served, *twin, device), "live_ok": live_ok})
            if path:
                row.update({"acc_test_gold": m.acc_test_before, "acc_union_gold": m.acc_forget_before,
                            "delta_union": abs(m.acc_forget_after - m.acc_forget_before), "asr_gold": m.asr_before,
                            "acc_wide_gold": _accuracy(reference_model, *wide, device)})


def summarize(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rows = result["rows"]
    scored = rows + ([result["end"]] if result["end"] else [])
    single = rows[1].get("request_to_serving_s") if len(rows) > 1 else None
    # a request whose job found nothing left to do (held, then covered by an exact retrain) has no server-side
    # timing: its time is the client's wait for it
    times = [r["request_to_serving_s"] if r.get("request_to_serving_s") is not None else r.get("wait_s")
             for r in rows[2:]]
    times = [t for t in times if t is not None]
    median = statistics.median(times) if times else None
    golds = [r for r in scored if r["acc_test_gold"] is not None]
    gaps = [r["acc_test_gold"] - r["acc_test"] for r in golds]
    gold_accs = [r["acc_test_gold"] for r in golds]
    wide = [r["acc_wide_gold"] - r["acc_wide"] for r in golds if r.get("acc_wide_gold") is not None]
    wide_golds = [r["acc_wide_gold"] for r in golds if r.get("acc_wide_gold") is not None]
    return {"wide_size": scored[0].get("wide_size"), "wide_max_gap": max(wide) if wide else None,
            "wide_rows_within_2": sum(abs(g) <= 2.0 for g in wide), "wide_final_gap": wide[-1] if wide else None,
            "wide_gold_step_max": max((abs(b - a) for a, b in zip(wide_golds, wide_golds[1:])), default=None),
            "max_acc_test_gap": max(gaps) if gaps else None,
            "max_abs_acc_test_gap": max(map(abs, gaps)) if gaps else None,
            "rows_within_2": sum(abs(g) <= 2.0 for g in gaps),
            # how much the golds themselves differ (each trained once, on a slightly smaller set): the floor
            "gold_acc_test_range": [min(gold_accs), max(gold_accs)] if gold_accs else None,
            "gold_acc_test_mean": statistics.fmean(gold_accs) if gold_accs else None,
            # one request removes 1-20 samples, yet the gold moves by this much from one request to the next
            "gold_step_max": max((abs(b - a) for a, b in zip(gold_accs, gold_accs[1:])), default=None),
            "rows_within_2_of_gold_mean": (sum(abs(statistics.fmean(gold_accs) - r["acc_test"]) <= 2.0 for r in golds)
                                           if gold_accs else None),
            "final_acc_test_gap": gaps[-1] if golds and golds[-1] is scored[-1] else None,
            "mean_delta_union": statistics.fmean(r["delta_union"] for r in golds) if golds else None,
            "rows_with_gold": len(golds), "rows": len(scored),
            "acc_test_first_last": [scored[0]["acc_test"], scored[-1]["acc_test"]],
            "single_request_s": single, "stream_median_s": median,
            "time_ratio": median / single if median and single else None,
            # a record written before the complete flag counts as complete when every request has a row
            "requests": len(rows) - 1, "complete": result.get("complete", len(rows) == len(result["requests"])),
            "forgotten": scored[-1]["union"], "exact_versions": result["exact_versions"],
            "live_checks_ok": sum(bool(r.get("live_ok")) for r in scored), "live_checks": len(scored),
            "prepare_s": result["prepare_s"], "drain_s": result["drain_s"], "serve_args": serve_args(args)}


COLUMNS = [("k", "k", "{}"), ("owner", "owner_size", "{}"), ("forgotten", "union", "{}"),
           ("served", "version", "v{}"), ("kind", "kind", "{}"), ("ACC eval split served", "acc_test", "{:.1f}"),
           ("ACC eval split gold", "acc_test_gold", "{:.1f}"), ("ACC unseen served", "acc_wide", "{:.1f}"),
           ("ACC unseen gold", "acc_wide_gold", "{:.1f}"), ("ACC twin served", "acc_twin", "{:.1f}"),
           ("Delta union", "delta_union", "{:.1f}"),
           ("ASR served", "asr", "{:.1f}"), ("ASR gold", "asr_gold", "{:.1f}"),
           ("request to serving s", "request_to_serving_s", "{:.1f}"), ("live", "live_ok", "{}")]


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} points"


def _span(values: list[float] | None) -> str:
    return "-" if not values else f"{values[0]:.1f} to {values[1]:.1f}"


def print_table(result: dict[str, Any], summary: dict[str, Any]) -> None:
    print("| " + " | ".join(title for title, _, _ in COLUMNS) + " |")
    print("|" + " --- |" * len(COLUMNS))
    for row in result["rows"] + ([result["end"]] if result["end"] else []):
        cells = ["-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in COLUMNS]
        print("| " + " | ".join(cells) + " |")
    ratio = summary["time_ratio"]
    first, last = summary["acc_test_first_last"]
    print(f"\nEval split (the service's drift measure): served {first:.1f} -> {last:.1f}; against the gold "
          f"({summary['rows_with_gold']} of "
          f"{summary['rows']} rows have one): max gap {_points(summary['max_acc_test_gap'])} (at the end "
          f"{_points(summary['final_acc_test_gap'])}; within 2 points {summary['rows_within_2']} rows; the golds "
          f"span {_span(summary['gold_acc_test_range'])} and move up to {_points(summary['gold_step_max'])} from "
          f"one request to the next; within 2 points of their mean {summary['rows_within_2_of_gold_mean']} rows), "
          f"mean Delta on the union "
          f"{_points(summary['mean_delta_union'])}; {summary['forgotten']} samples forgotten in "
          f"{summary['requests']} requests after the quickstart's"
          + ("" if summary["complete"] else f" (the run stopped before its {len(result['requests']) - 1})"))
    if summary["wide_size"]:
        print(f"Unseen: on the {summary['wide_size']} test images no model sees (the eval split among them): "
              f"max gap below the gold {_points(summary['wide_max_gap'])} (at the end {_points(summary['wide_final_gap'])}); "
              f"within 2 points {summary['wide_rows_within_2']} of {summary['rows_with_gold']} rows; the golds move "
              f"up to {_points(summary['wide_gold_step_max'])} from one request to the next")
    if summary["single_request_s"] is None:  # a replay: no service, no request times
        return
    print(f"request to serving: single prepared request {summary['single_request_s']}s, stream median "
          f"{summary['stream_median_s']}s, ratio {'-' if ratio is None else f'{ratio:.2f}'} (target <= 1.2); "
          f"prepare {summary['prepare_s']}s")
    print(f"exact versions landed: {len(summary['exact_versions'])} {summary['exact_versions']}; jobs drained in "
          f"{'-' if summary['drain_s'] is None else summary['drain_s']}s; versions whose TorchServe answers "
          f"matched their copy's {summary['live_checks_ok']}/{summary['live_checks']}; serve start args "
          f"{' '.join(summary['serve_args']) or '(none)'}")


def phase_stream(args: argparse.Namespace) -> dict[str, Any]:
    """The service run; its raw record goes to ``runs/<label>/stream.json`` (after each request, and at the end)."""
    from tmu_core.service.quickstart import sample_png

    with reference_index(args) as reference:
        requests = request_sequence(args, reference)
        # the first test image of each class: what TorchServe answers must be what the served copy answers
        probe_ids = [reference.ids("test", classes=[c])[0] for c in range(len(reference.classes))]
        probes = [sample_png(reference, sid) for sid in probe_ids]
    run = Run(args)
    result: dict[str, Any] = {"label": run.label, "requests": requests, "probe_ids": probe_ids, "rows": [],
                              "end": None, "prepare_s": None, "drain_s": None, "exact_versions": [],
                              "versions": [], "complete": False,
                              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(f"run {run.label}: workspace {run.folder}, copies in {run.dir}", file=sys.stderr, flush=True)
    try:
        stream(args, run, result, probes)
    finally:
        run.stop()
        run.save(result)
    return result


def tmu_options(pairs: list[str]) -> dict[str, Any]:
    """``--tmu KEY=VALUE`` pairs as keyword arguments of the ``tmu`` method."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--tmu {pair!r}: give KEY=VALUE, e.g. --tmu retain_from=twin")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def guard_trace(tune: dict[str, Any]) -> dict[str, Any] | None:
    """The guard's accuracies on its held-out images in one request (before, after, the level its repairs
    restore) and its repair steps; None for a request it did not watch."""
    if tune.get("guard_accuracy_before") is None:
        return None
    return {"before": round(tune["guard_accuracy_before"], 1), "after": round(tune["guard_accuracy_after"], 1),
            "level": round(tune["guard_level"], 1), "repairs": tune["refused_steps"]}


def phase_replay(args: argparse.Namespace) -> dict[str, Any]:
    """The stream's requests applied by the library alone, the way a forget job does it: the serving version's
    TMU state as the base's quickstart job prepared it (built when the options differ), then for each next version
    updated from its parent's as ``prepare_next`` does, the request unlearned, the result the next request's
    model. No service, no timings of one: a fast comparison of TMU's options (``--tmu``) on the same sequence and
    golds. Rows go to ``runs/<label>/stream.json``."""
    from tmu_core.device import resolve_device
    from tmu_core.forget.artifacts import plan_data
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import load_checkpoint, save_checkpoint
    from tmu_core.unlearn import UnlearnData, get_method

    device = resolve_device(args.device)
    options = tmu_options(args.tmu)
    label = args.label or "replay" + "".join(f"_{k}={v}" for k, v in sorted(options.items()))
    folder = _paths(args)["runs"] / label
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "served").mkdir(parents=True)
    built = json.loads(_paths(args)["build"].read_text())
    checkpoint = Path(built["checkpoint"].replace(str(_paths(args)["folder"]), str(_paths(args)["base"])))
    model, meta = load_checkpoint(checkpoint, device)
    method, parent = get_method("tmu", **options), None
    # The service's first request uses the state the quickstart's job prepared for the base's version (an update
    # of v1's, so its held-out reference is v1's); a copy, so that other options' build never writes into the base.
    # The copy serves request 1's preparation only; it is removed at the end, also when the replay stops part way.
    with reference_index(args) as reference, tempfile.TemporaryDirectory(dir=folder) as scratch:
        first = Path(scratch) / "base-artifacts"
        if (checkpoint.parent / "artifacts").is_dir():
            shutil.copytree(checkpoint.parent / "artifacts", first)
        view = reference.view(Preprocess.from_meta(meta))
        requests = request_sequence(args, reference)
        plan = plan_data(reference, 0.5, 0)
        gone = set(requests[0])
        result: dict[str, Any] = {"label": label, "requests": requests, "rows": [], "end": None, "prepare_s": None,
                                  "drain_s": None, "exact_versions": [], "options": options, "complete": False,
                                  "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        result["rows"].append({"k": 0, "owner_size": len(requests[0]), "version": built["serving_version"],
                               "kind": "approximate", "checkpoint": str(folder / "served" / "k0.pt")})
        save_checkpoint(folder / "served" / "k0.pt", model, meta)
        for k, ids in enumerate(requests[1:], start=1):
            retain = tuple(i for i in plan.train_ids if i not in gone)
            clock = Clock()
            how = method.prepare_from(parent, model, meta, UnlearnData(view, (), retain, plan.twin_ids), device,
                                      workdir=first if k == 1 and first.is_dir() else None)
            prepare_s = clock.read()[0]
            gone |= set(ids)
            data = UnlearnData(view, tuple(ids), tuple(i for i in retain if i not in gone), plan.twin_ids)
            outcome = method.unlearn(model, meta, data, device)
            parent, model = method.prepared, outcome.model
            path = folder / "served" / f"k{k}.pt"
            save_checkpoint(path, model, meta)
            details = outcome.details
            result["rows"].append({"k": k, "owner_size": len(ids), "version": built["serving_version"] + k,
                                   "kind": "approximate", "checkpoint": str(path), "prepared": how,
                                   "prepare_s": round(prepare_s, 1), "unlearn_s": round(outcome.seconds, 1),
                                   "predicted_hard": details["predicted_hard"], "steps": details["steps"],
                                   "stop_reason": details["stop_reason"], "guard": guard_trace(details["tune"])})
            print(f"replay {k}: {len(ids)} samples, {details['predicted_hard']} predicted hard, "
                  f"{details['steps']} steps ({details['stop_reason']}), prepared {how} in {prepare_s:.1f}s, "
                  f"guard {result['rows'][-1]['guard']}",
                  file=sys.stderr, flush=True)
            (folder / "stream.json").write_text(json.dumps(result, indent=2, default=str))
    result["complete"] = True
    (folder / "stream.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def phase_score(args: argparse.Namespace, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score a run (this one, or ``runs/<label>/stream.json`` of an earlier one), print and write the table."""
    if result is None:
        label = args.label or run_label(args)
        result = json.loads((_paths(args)["runs"] / label / "stream.json").read_text())
    score(args, result)
    summary = summarize(result, args)
    print_table(result, summary)
    out = {"summary": summary, **result}
    (_paths(args)["runs"] / result["label"] / "result.json").write_text(json.dumps(out, indent=2, default=str))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"load average at the start: {os.getloadavg()}", file=sys.stderr, flush=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    phases = PHASES if args.phase == "all" else (args.phase,)
    if "build" in phases or not _paths(args)["build"].is_file():
        print(f"build: {json.dumps(phase_build(args))[:400]}", file=sys.stderr, flush=True)
    if "golds" in phases:
        phase_golds(args)
    result = phase_stream(args) if "stream" in phases else phase_replay(args) if OFFLINE in phases else None
    if OFFLINE in phases:
        phases = (*phases, "score")
    if "score" in phases:
        phase_score(args, result)
    print(f"load average at the end: {os.getloadavg()}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
