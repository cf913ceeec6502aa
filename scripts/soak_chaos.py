"""Soak-and-chaos benchmark: two models whose data owners overlap, under load, forget requests and faults.

Builds a fresh workspace (scikit-learn digits by default, offline; or ``--data`` a CIFAR-10-style zip, a subset),
assigns owners of 10 training samples each, trains model ``a`` on owners 0..59 and model ``b`` on owners 30..89
(owners 30..59 are in both), packages both and starts them with ``tmu-admin serve start`` (TorchServe keys
expiring every ``--key-expiry-min`` minutes, ``--retention 0s``: superseded versions' files deleted at commit).
Then, for ``--minutes``: ``--clients`` threads send predictions to both models; about every ``--forget-every``
seconds a data-centric ``POST /forget`` asks for 1-3 owners not yet forgotten; about every ``--fault-every``
seconds a fault (seeded) kills a running forget job's worker, locks the state database past its busy timeout, or
kills TorchServe with SIGKILL and restarts it with ``tmu-admin serve start`` while the extension keeps running.
After the deadline it waits for the open forget requests, stops everything it started (also on Ctrl-C or an
error) and checks:

- every model version TorchServe serves excludes every forgotten sample from its training membership;
- every forget request succeeded; ``tmu-admin index verify`` passes; ``tmu-admin audit --verify --head`` passes
  against the head copied outside the workspace after each request ended;
- no forgotten image's stored bytes are left in any file under the workspace and the model store;
- no prediction failed outside the TorchServe restart windows (kill to first success after the restart).

Usage: OMP_NUM_THREADS=1 python scripts/soak_chaos.py [--minutes 30] [--seed 0] [--out soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_support import FAULT_KINDS, Events, Extension, Faults, Forgets, KeyFile, Load, stop_leftovers

OWNER_SIZE = 10
MODELS = {"a": range(60), "b": range(30, 90)}  # owner numbers each model is trained on


class Context:
    """The run's workspace, TorchServe config and extension, shared by the loops."""

    def __init__(self, home: Path, aux: Path, seed: int, key_expiry_min: int) -> None:
        from tmu_core.config import Workspace
        from tmu_core.serving import TorchServeConfig

        self.workspace = Workspace(home=home, model_store=home / "model_store")
        self.seed, self.aux = seed, aux
        self.config = TorchServeConfig.with_free_ports(self.workspace.model_store,
                                                       token_expiration_min=key_expiry_min)
        self.config_path = self.config.write(aux / "config.properties")
        self.extension = Extension(self.workspace)

    def torchserve(self) -> Any:
        from tmu_core.serving import TorchServe

        return TorchServe(self.workspace, self.config)

    def serve_start(self) -> dict[str, Any]:
        """``tmu-admin serve start`` (tried three times); ``rc``, ``done_at`` and what it started."""
        for attempt in range(3):
            done = run_cli(self.workspace, "serve", "start", "--config", str(self.config_path), "--retention", "0s",
                           timeout=600)
            if done.returncode == 0:
                return {"rc": 0, "done_at": time.time(), "started": json.loads(done.stdout).get("started")}
            print(f"serve start failed (attempt {attempt + 1}): {done.stdout[-400:]} {done.stderr[-800:]}",
                  file=sys.stderr)
            time.sleep(5)
        return {"rc": done.returncode, "done_at": time.time(), "error": done.stderr[-800:]}


def run_cli(workspace: Any, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """``tmu-admin --home H --model-store M ARGS`` (the one beside this interpreter), output captured."""
    cmd = [str(Path(sys.executable).parent / "tmu-admin"), "--home", str(workspace.home), "--model-store",
           str(workspace.model_store), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          check=False)


def owner(n: int) -> str:
    return f"owner-{n:03d}"


def build(ctx: Context, args: argparse.Namespace) -> tuple[dict[str, list[str]], list[bytes]]:
    """Index, assign owners, train and package both models (v1, with their members), prepare their TMU state."""
    from tmu_core.device import resolve_device, seed_everything
    from tmu_core.forget.artifacts import prepare_version
    from tmu_core.index import ingest_digits, ingest_zip
    from tmu_core.service.quickstart import sample_png
    from tmu_core.serving import package_version
    from tmu_core.state.versions import VersionRegistry
    from tmu_core.train import TrainConfig, save_checkpoint, train_model

    ws = ctx.workspace
    ws.ensure_dirs()

    def ingest(owners: dict[str, str] | None) -> Any:
        if args.data is None:
            return ingest_digits(ws.index_dir, seed=args.seed, owners=owners, overwrite=True)
        return ingest_zip(args.data, ws.index_dir, owners=owners, train_per_class=args.train_per_class,
                          test_per_class=20, overwrite=True)

    with ingest(None) as plain:
        train_ids = plain.ids("train")
    needed = OWNER_SIZE * (max(max(r) for r in MODELS.values()) + 1)
    if len(train_ids) < needed:
        raise SystemExit(f"{len(train_ids)} training samples; the owners need {needed} (raise --train-per-class)")
    order = random.Random(args.seed).sample(train_ids, len(train_ids))
    owners = {sid: owner(rank // OWNER_SIZE) for rank, sid in enumerate(order)}
    seed_everything(args.seed)
    device = resolve_device("auto")
    members: dict[str, list[str]] = {}
    with ingest(owners) as index:
        images = [sample_png(index, sid) for sid in index.ids("test")[:8]]
        for name, numbers in MODELS.items():
            ids = sorted(index.ids_for_owners([owner(n) for n in numbers]))
            cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, augment=False, seed=args.seed)
            result = train_model(index, ids, "small_cnn", cfg, device)
            staged = save_checkpoint(ws.home / "staged" / f"{name}.pt", result.model, result.meta)
            package = package_version(staged, ws, name, 1, backend="onnx", batch_size=8, max_batch_delay=10)
            VersionRegistry(ws.state_db).record_version(
                name, 1, package.archive, package.checkpoint, package.onnx, parent=None, forget_request=None,
                metrics={"train_accuracy": result.history.train_acc[-1]}, members=ids)
            members[name] = ids
            print(f"model {name}: {len(ids)} samples, train accuracy {result.history.train_acc[-1]:.1f}%",
                  file=sys.stderr)
    shutil.rmtree(ws.home / "staged", ignore_errors=True)
    for name in MODELS:
        prepare_version(ws, name, device=str(device))
    return members, images


def run(ctx: Context, args: argparse.Namespace, stop: threading.Event) -> dict[str, Any]:
    """Serve, load, forget and inject faults until the deadline; drain the requests; return what happened."""
    members, images = build(ctx, args)
    started = ctx.serve_start()
    if started["rc"] != 0:
        raise SystemExit(f"tmu-admin serve start failed: {started.get('error')}")
    rng = random.Random(args.seed)
    t0 = time.time()
    deadline = t0 + args.minutes * 60
    events = Events(t0)
    models = sorted(MODELS)
    load = Load(ctx.config.url("inference"), KeyFile(ctx.torchserve().key_file), models, images, args.clients)
    forget_owners = sorted({owner(n) for numbers in MODELS.values() for n in numbers})
    forgets = Forgets(ctx, random.Random(rng.random()), forget_owners, args.forget_every, deadline, stop, events,
                      ctx.aux / "audit-heads.jsonl")
    faults = Faults(ctx, random.Random(rng.random()), args.fault_every, deadline, stop, events, ctx.serve_start,
                    args.lock_hold_s)
    ctx.loops = (load, forgets, faults)
    load.start(), forgets.start(), faults.thread.start()
    stop.wait(max(0.0, deadline - time.time()))
    faults.thread.join()
    drained = forgets.drain(time.time() + args.drain_minutes * 60)
    load_end = time.time()
    load.join()
    served = registered_versions(ctx, models)
    return {"t0": t0, "deadline": deadline, "load_end": load_end, "drained": drained, "members": members, "load": load,
            "forgets": forgets, "faults": faults, "events": events, "served": served}


def registered_versions(ctx: Context, models: list[str]) -> dict[str, list[int]]:
    """The versions TorchServe has registered for each model now."""
    client = ctx.torchserve().management()
    return {m: sorted(int(info.version) for info in client.describe(m, "all")) for m in models}


def check(ctx: Context, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The invariants, each ``{"name", "ok", ...numbers}``."""
    from tmu_core.state.versions import VersionRegistry

    forgets, registry = result["forgets"], VersionRegistry(ctx.workspace.state_db)
    succeeded = [r for r in forgets.records if r.state == "succeeded"]
    forgotten = {s for r in succeeded for s in r.samples}
    checks = []
    for model, versions in result["served"].items():
        serving = registry.serving(model).version
        # None: the version has no recorded membership, which fails the check as surely as a leak
        leaked = {v: None if (m := registry.members(model, v)) is None else len(m & forgotten) for v in versions}
        mine = forgotten & set(result["members"][model])
        unrecorded = len(mine - registry.forgotten(model))
        checks.append({"name": f"model {model}: served versions exclude forgotten samples",
                       "ok": versions == [serving] and all(n == 0 for n in leaked.values()) and unrecorded == 0,
                       "served": versions, "registry_serving": serving, "forgotten_in_members": leaked,
                       "its_samples_forgotten": len(mine), "not_in_registry_forgotten": unrecorded})
    bad = [{"n": r.n, "request": r.request_id, "state": r.state, "error": r.error} for r in forgets.records
           if r.state != "succeeded"]
    checks.append({"name": "every forget request succeeded", "ok": not bad and result["drained"],
                   "requests": len(forgets.records), "succeeded": len(succeeded), "not_succeeded": bad})
    verify = run_cli(ctx.workspace, "index", "verify")
    checks.append({"name": "tmu-admin index verify", "ok": verify.returncode == 0,
                   "output": (verify.stdout + verify.stderr).strip()[-300:]})
    head = forgets.last_head
    audit = run_cli(ctx.workspace, "audit", "--verify", "--head", f"{head.seq}:{head.hash}") if head else None
    checks.append({"name": "tmu-admin audit --verify --head (copied outside)", "ok": bool(audit and audit.returncode == 0),
                   "head": f"{head.seq}:{head.hash[:12]}..." if head else None,
                   "output": (audit.stdout + audit.stderr).strip()[-300:] if audit else "no head was copied"})
    checks.append(bytes_check(ctx, forgets, forgotten))
    checks.append(prediction_check(result))
    return checks


def bytes_check(ctx: Context, forgets: Forgets, forgotten: set[str]) -> dict[str, Any]:
    """Search every file under the workspace and the model store for each forgotten sample's stored bytes."""
    from tmu_core.index import TrainingIndex

    with TrainingIndex.open(ctx.workspace.index_dir) as index:
        live = [s for s in index.ids("train") + index.ids("test") if not index.is_forgotten(s)]
        records = index.lookup(live)
    with (ctx.workspace.index_dir / "blobs.bin").open("rb") as blob:
        live_bytes = set()
        for record in records:
            blob.seek(record.offset)
            live_bytes.add(blob.read(record.length))
    patterns = {s: forgets.images[s] for s in forgotten if forgets.images[s] not in live_bytes}
    # control: a retained sample's bytes must be found where the index keeps them, or the scan proves nothing
    control = max(records, key=lambda r: r.length)
    with (ctx.workspace.index_dir / "blobs.bin").open("rb") as blob:
        blob.seek(control.offset)
        patterns["control"] = blob.read(control.length)
    started = time.time()
    hits = scan_for_bytes([ctx.workspace.home, ctx.workspace.model_store], patterns)
    found = [h for h in hits if h["sample"] != "control"]
    control_ok = any(h["sample"] == "control" and h["offset"] == control.offset for h in hits)
    return {"name": "no forgotten image's bytes on disk", "ok": not found and control_ok,
            "searched": len(patterns) - 1, "same_bytes_as_a_retained_sample": len(forgotten) - len(patterns) + 1,
            "control_found": control_ok, "hits": found[:20], "scan_s": round(time.time() - started, 1)}


def scan_for_bytes(roots: list[Path], patterns: dict[str, bytes], chunk: int = 1 << 20) -> list[dict[str, Any]]:
    """Every place under ``roots`` where one of ``patterns`` (name -> byte string) occurs, in every file.

    Each pattern is found through a fixed-length anchor (its last ``k`` bytes but two) by a rolling hash over
    each chunk, and every candidate is then compared byte for byte, so the answer is exact.
    """
    if not patterns:
        return []
    k = min(64, min(len(p) for p in patterns.values()))
    base = np.uint64(1_000_003)
    inverse = np.uint64(pow(1_000_003, -1, 1 << 64))
    span = chunk + k
    pw = np.cumprod(np.full(span, base, dtype=np.uint64)) * inverse  # base ** i
    pw_inv = np.cumprod(np.full(span, inverse, dtype=np.uint64)) * base  # base ** -i

    def anchor_at(data: bytes) -> int:
        return len(data) - k - 2 if len(data) >= k + 2 else len(data) - k

    wanted: dict[int, list[str]] = {}
    for name, data in patterns.items():
        start = anchor_at(data)
        window = np.frombuffer(data[start:start + k], dtype=np.uint8).astype(np.uint64)
        wanted.setdefault(int(np.sum(window * pw_inv[:k])), []).append(name)
    keys = np.sort(np.fromiter(wanted, dtype=np.uint64))
    hits: list[dict[str, Any]] = []
    seen: set[tuple[str, int, str]] = set()
    files = {p.resolve() for root in roots if root.exists() for p in root.rglob("*") if p.is_file()}
    for path in sorted(files):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile
        try:
            offset = 0
            while data := os.pread(fd, span, offset):
                if len(data) >= k:
                    values = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
                    prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(values * pw_inv[:len(values)])])
                    sums = (prefix[k:] - prefix[:-k]) * pw[:len(values) - k + 1]
                    slot = np.minimum(np.searchsorted(keys, sums), len(keys) - 1)
                    for i in np.nonzero(keys[slot] == sums)[0].tolist():
                        for name in wanted[int(sums[i])]:
                            at = offset + i - anchor_at(patterns[name])
                            if at >= 0 and (str(path), at, name) not in seen and \
                                    os.pread(fd, len(patterns[name]), at) == patterns[name]:
                                seen.add((str(path), at, name))
                                hits.append({"file": str(path), "offset": at, "sample": name})
                if len(data) < span:
                    break
                offset += chunk
        finally:
            os.close(fd)
    return hits


def prediction_check(result: dict[str, Any]) -> dict[str, Any]:
    """Failed predictions inside the TorchServe restart windows (kill .. first success after it) and outside."""
    load, windows = result["load"], []
    for fault in result["faults"].log:
        if fault["kind"] == "fault kill_torchserve":
            ends = [load.first_success_after(fault["at"], m) for m in range(len(MODELS))]
            windows.append((fault["at"], max(e if e is not None else result["load_end"] for e in ends)))
    failures = load.failures()
    inside = [f for f in failures if any(a <= f[1] <= b for a, b in windows)]
    outside = [f for f in failures if f not in inside]
    return {"name": "no failed prediction outside TorchServe restarts", "ok": not outside,
            "inside": len(inside), "outside": len(outside), "windows_s": [round(b - a, 1) for a, b in windows],
            "outside_examples": [{"t": round(f[1] - result["t0"], 1), "model": sorted(MODELS)[f[2]],
                                  "error": f[3]} for f in outside[:10]]}


def summarize(result: dict[str, Any], checks: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    load, forgets, faults = result["load"].summary(), result["forgets"], result["faults"].log
    kinds = {kind: sum(f["kind"] == f"fault {kind}" for f in faults) for kind in FAULT_KINDS}
    skipped = [f["kind"] for f in faults if not f["kind"].removeprefix("fault ") in FAULT_KINDS]
    prediction = next(c for c in checks if c["name"].startswith("no failed prediction"))
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "minutes": round((result["deadline"] - result["t0"]) / 60, 2),
            "drain_minutes": round((result["load_end"] - result["deadline"]) / 60, 2),
            "predictions": {**load, "requests": load["succeeded"] + load["failed"],
                            "failed_inside_restarts": prediction["inside"],
                            "failed_outside_restarts": prediction["outside"]},
            "forget_requests": {"sent": len(forgets.records),
                                "accepted": sum(r.request_id is not None for r in forgets.records),
                                "succeeded": sum(r.state == "succeeded" for r in forgets.records),
                                "owners": sum(len(r.owners) for r in forgets.records),
                                "samples": sum(len(r.samples) for r in forgets.records),
                                "seconds": [round(r.finished_at - r.accepted_at, 1) for r in forgets.records
                                            if r.finished_at and r.accepted_at],
                                "records": [asdict(r) for r in forgets.records]},
            "faults": {"injected": kinds, "skipped": skipped, "log": faults},
            "invariants": checks, "all_passed": all(c["ok"] for c in checks), "events": result["events"].items}


def table(summary: dict[str, Any]) -> str:
    p, f, faults = summary["predictions"], summary["forget_requests"], summary["faults"]
    seconds = sorted(f["seconds"]) or [float("nan")]
    rows = [("duration: minutes to the deadline + draining the open requests",
             f"{summary['minutes']:.1f} + {summary['drain_minutes']:.1f}"),
            ("prediction requests", f"{p['requests']:,}"),
            ("failed: inside TorchServe restarts / outside",
             f"{p['failed_inside_restarts']} / **{p['failed_outside_restarts']}**"),
            ("latency p50 / p99 / max (ms)", f"{p['p50_ms']:.1f} / {p['p99_ms']:.1f} / {p['max_ms']:.0f}"),
            ("token refusals answered by re-reading the key file", f"{p['token_retries']}"),
            ("answers by version", json.dumps(p["versions"])),
            ("forget requests: sent / accepted / succeeded", f"{f['sent']} / {f['accepted']} / {f['succeeded']}"),
            ("owners / samples asked for", f"{f['owners']} / {f['samples']}"),
            ("request seconds: median / max", f"{seconds[len(seconds) // 2]:.1f} / {seconds[-1]:.1f}"),
            ("faults injected: " + ", ".join(faults["injected"]), " / ".join(map(str, faults["injected"].values()))
             + (f" (skipped: {len(faults['skipped'])})" if faults["skipped"] else ""))]
    lines = ["| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "", "| invariant | result | numbers |",
             "| --- | --- | --- |"]
    for c in summary["invariants"]:
        numbers = {k: v for k, v in c.items() if k not in ("name", "ok", "output")}
        lines.append(f"| {c['name']} | {'PASS' if c['ok'] else 'FAIL'} | {json.dumps(numbers, default=str)[:400]} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load, forgets and faults run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent prediction clients")
    parser.add_argument("--forget-every", type=float, default=60.0, help="seconds between forget requests (about)")
    parser.add_argument("--key-expiry-min", type=int, default=5, help="TorchServe's token_expiration_min")
    parser.add_argument("--fault-every", type=float, default=120.0, help="seconds between faults (about)")
    parser.add_argument("--lock-hold-s", type=float, default=40.0, help="how long the state database stays locked")
    parser.add_argument("--drain-minutes", type=float, default=15.0, help="how long to wait for open requests")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of each model")
    parser.add_argument("--data", type=Path, default=None, help="CIFAR-10-style ImageFolder zip (default: digits)")
    parser.add_argument("--train-per-class", type=int, default=100, help="with --data: training images a class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", type=Path, default=None, help="workspace to create (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temp workspace after a passing run")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.home is not None and args.home.exists() and any(args.home.iterdir()):
        parser.error(f"--home {args.home} exists and is not empty; give a new folder")
    return args


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    home = (args.home or Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp")) / "home").absolute()
    aux = Path(tempfile.mkdtemp(prefix="soak-aux-", dir="/tmp"))
    ctx, stop = Context(home, aux, args.seed, args.key_expiry_min), threading.Event()
    print(f"workspace {home}; config and audit heads in {aux}", file=sys.stderr)
    try:
        result = run(ctx, args, stop)
    finally:
        stop.set()
        load, _, faults = getattr(ctx, "loops", (None, None, None))
        if load is not None:
            load.join()
            faults.thread.join(timeout=300)  # a TorchServe restart in flight ends before the stop
        stopped = run_cli(ctx.workspace, "serve", "stop", timeout=120)
        print((stopped.stdout + stopped.stderr).strip(), file=sys.stderr)
        leftovers = stop_leftovers(home)
        if leftovers:
            print(f"stopped leftover processes {leftovers}", file=sys.stderr)
    result["forgets"].finished.set()
    summary = summarize(result, check(ctx, result), args)
    print(table(summary))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2, default=str))
    if summary["all_passed"] and args.home is None and not args.keep:
        shutil.rmtree(home.parent, ignore_errors=True)
        shutil.rmtree(aux, ignore_errors=True)
    else:
        print(f"kept {home} and {aux}", file=sys.stderr)
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
