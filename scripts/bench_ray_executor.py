"""Benchmark: request-to-serving time of 100-sample forget requests with the warm Ray actor (``--executor ray``)
against the worker process (``--executor local``, the default), on the same model, requests and machine.

The setting is ``scripts/bench_stream.py``'s CIFAR-10 quickstart workspace (build it first with ``bench_stream.py
--work W --phase build``): v2 of a small CNN trained on 5,000 images. For each executor a fresh copy of it is
served through the real stack (``tmu-admin serve start``: TorchServe, the extension, its job workers), and two
requests of 100 random training samples each (the same ids for both executors, drawn by ``--seed``) are sent one
after the other, the second once the first one's version is prepared (the job's follow-up):

- ``local``: ``tmu-admin prepare`` first, so request 1 finds its version prepared, as does request 2;
- ``ray``: a loopback Ray cluster (a head with no CPUs and one worker node of ``--node-cpus``) started here;
  request 1 creates the model's actor (cold: weights, pixels and the prepared state sent or built there),
  request 2 finds it warm.

The drift budget is off in both runs, so that no background retrain shares the cores with the requests.

The table gives each request's request-to-serving time and the steps inside it (from the job's report: worker
start, load with its preparation, unlearn, evaluate, the rest up to serving). Both executors share the machine's
cores with everything else that runs; say so when quoting the numbers. Example::

    OMP_NUM_THREADS=2 python scripts/bench_ray_executor.py --work /tmp/bench-stream
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

# Read by Ray when it is imported (see tests/conftest.py): keep every socket on loopback, usage reporting off.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_stream  # noqa: E402
from bench_stream import MODEL, Run  # noqa: E402

STEPS = ("worker_start", "load", "prepare_artifacts", "unlearn", "evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="bench_stream.py's --work (its built quickstart)")
    parser.add_argument("--samples", type=int, default=100, help="training samples each request forgets")
    parser.add_argument("--seed", type=int, default=0, help="draws the requests' samples")
    parser.add_argument("--node-cpus", type=int, default=2, help="CPUs of the Ray worker node (and of the actor)")
    parser.add_argument("--executors", default="local,ray", help="which executors to run, in order")
    parser.add_argument("--job-timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser.parse_args(argv)


def requests(args: argparse.Namespace, stream_args: argparse.Namespace) -> list[list[str]]:
    """Two disjoint draws of ``--samples`` training ids the quickstart has not forgotten."""
    with bench_stream.reference_index(stream_args) as reference:
        gone = set(bench_stream._first_request(stream_args, reference))
        pool = sorted(set(reference.ids("train")) - gone)
    rng = random.Random(args.seed)
    drawn = rng.sample(pool, 2 * args.samples)
    return [sorted(drawn[:args.samples]), sorted(drawn[args.samples:])]


def wait_prepared(run: Run, job_id: str, timeout: float) -> dict[str, Any]:
    """Wait for the job's follow-up (the new version's preparation); its record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        followup = run.client.job(job_id).get("followup") or {}
        if followup.get("artifacts") in ("ready", "failed"):
            return followup
        time.sleep(0.5)
    raise SystemExit(f"job {job_id}: the next version was not prepared within {timeout:.0f}s")


def one_executor(args: argparse.Namespace, kind: str, ids: list[list[str]], address: str | None) -> list[dict]:
    stream_args = bench_stream.parse_args(["--work", str(args.work), "--label", f"executor-{kind}"])
    run = Run(stream_args)
    extra = ["--drift-budget", "off"]  # no background retrain sharing the cores with the requests
    if kind == "ray":
        extra += ["--executor", "ray", "--ray-address", address, "--ray-num-cpus", str(args.node_cpus)]
    rows = []
    try:
        run.start(extra)
        if kind == "local":
            done = bench_stream.run_cli(run.workspace, "prepare", MODEL, timeout=900)
            if done.returncode != 0:
                raise SystemExit(f"tmu-admin prepare failed: {done.stderr[-800:]}")
        for k, sample_ids in enumerate(ids, start=1):
            row = run.forget(k, sample_ids, args.seed + 1000, args.job_timeout)
            job = run.client.job(row["job"])
            timings = (job.get("result") or {}).get("timings", {})
            details = (job.get("result") or {}).get("unlearn_details", {})
            followup = wait_prepared(run, row["job"], args.job_timeout)
            rows.append({"executor": kind, "request": k, "samples": len(sample_ids),
                         "request_to_serving_s": timings.get("request_to_serving"),
                         **{f"{s}_s": timings.get(s) for s in STEPS},
                         "prepared": details.get("prepared"), "node": (details.get("executor") or {}).get("node"),
                         "next_prepared_s": followup.get("seconds"), "next_preparation": followup.get("preparation")})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        run.stop()
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["executor", "request", "samples", "prepared", "request_to_serving_s", *[f"{s}_s" for s in STEPS],
            "next_prepared_s", "next_preparation"]
    print("| " + " | ".join(cols) + " |")
    print("| " + " | ".join("---" for _ in cols) + " |")
    for row in rows:
        print("| " + " | ".join("-" if row.get(c) is None else str(row.get(c)) for c in cols) + " |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"load average at the start: {os.getloadavg()}", file=sys.stderr, flush=True)
    ids = requests(args, bench_stream.parse_args(["--work", str(args.work)]))
    kinds = [k.strip() for k in args.executors.split(",") if k.strip()]
    cluster = None
    rows: list[dict] = []
    try:
        for kind in kinds:
            if kind == "ray" and cluster is None:
                from ray.cluster_utils import Cluster

                cluster = Cluster(initialize_head=True, head_node_args={
                    "num_cpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
                cluster.add_node(num_cpus=args.node_cpus, node_ip_address="127.0.0.1")
                cluster.wait_for_nodes()
            rows += one_executor(args, kind, ids, cluster.address if cluster else None)
    finally:
        if cluster is not None:
            cluster.shutdown()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(f"load average at the end: {os.getloadavg()}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
