"""Fuzz both APIs against live servers, longer than the test suite does, and report cases and failures.

1. The management extension, served by uvicorn on loopback (dispatcher off) over a tiny synthetic workspace:
   the schemathesis CLI reads its ``/openapi.json`` and runs every phase with every check on
   (``--checks all``), with the service's token, ``--max-examples`` per operation and a fixed seed.
2. TorchServe (token auth on, free loopback ports) serving a tiny trained model: hypothesis-generated bad
   payloads (the strategies of ``tests/test_handler_fuzz.py``: random bytes, truncated and corrupted images,
   headers claiming huge images, odd JSON) are POSTed to ``/predictions/m``; each must get a 400 with a message,
   never a 5xx, and a good image must still be predicted afterwards.

Usage: .venv/bin/python scripts/fuzz_api.py [--examples 200] [--predict-examples 400] [--seed 0] [--json out.json]
Exit status 1 when any check failed. Needs Java 17 for TorchServe (``--no-torchserve`` skips step 2).

Imported by schemathesis as its hooks module (``SCHEMATHESIS_HOOKS=fuzz_api``), it registers only the hook below.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _register_hooks() -> None:
    import schemathesis

    @schemathesis.hook
    def map_case(context, case):  # noqa: ARG001 - the hook's signature
        # Method options are each method's own dataclass fields, ranges checked in code and answered 400
        # (documented); valid random option sets do not exist, so schema-valid bodies keep the defaults.
        if case.meta is not None and case.meta.generation.mode.is_positive and isinstance(case.body, dict):
            case.body.pop("options", None)
        return case


if __name__ == "fuzz_api":
    _register_hooks()


def _workspace(folder: Path):
    from test_service_support import make_index, make_workspace

    workspace = make_workspace(folder)
    make_index(workspace, folder).close()
    return workspace


def fuzz_extension(workspace, examples: int, seed: int, report: Path) -> dict:
    """Run ``st run`` against the live extension; returns cases, failures and seconds from its JSON report."""
    from test_service_support import record_fake_version
    from tmu_core.service.server import ServiceConfig, in_process

    record_fake_version(workspace, "m")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_api",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])}
    with in_process(workspace, ServiceConfig(run_jobs=False)) as running:
        started = time.perf_counter()
        cmd = [str(Path(sys.executable).with_name("st")), "run", f"{running.url}/openapi.json",
               "-H", f"Authorization: Bearer {running.key}", "--checks", "all", "--max-examples", str(examples),
               "--seed", str(seed), "--continue-on-failure", "--report", "json", "--report-json-path", str(report),
               "--no-color", "--workers", "1"]
        # Run from the workspace folder: the CLI keeps a cache folder (.schemathesis) in its working directory.
        proc = subprocess.run(cmd, env=env, cwd=workspace.home.parent, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
    tail = [line.strip() for line in proc.stdout.splitlines() if "generated" in line or "FAILED" in line]
    return {"exit": proc.returncode, "seconds": round(seconds, 1), "summary": _summary(report), "output_tail": tail}


def _summary(report: Path) -> dict:
    if not report.is_file():
        return {}
    data = json.loads(report.read_text())
    warnings = {name: value for name, value in data.get("warnings", {}).items() if value}
    return {"schemathesis": data.get("schemathesis_version"), "seed": data.get("seed"),
            "test_cases": data.get("test_cases"), "failures": data.get("failures"),
            "operations": {k: data["operations"][k] for k in ("selected", "tested")}, "warnings": warnings}


def fuzz_torchserve(workspace, examples: int, seed: int) -> dict:
    """POST generated bad payloads to a live TorchServe; returns cases, 400s and anything else."""
    import requests
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    from test_handler_fuzz import bad_payloads, good_images
    from test_service_support import make_v1, torchserve_config
    from tmu_core.serving import TorchServe

    v1 = make_v1(workspace)
    server = TorchServe(workspace, torchserve_config(workspace.model_store))
    server.start([f"m={v1.archive.name}"])
    counts = {"cases": 0, "answered_400": 0, "other": 0}
    others: list[str] = []
    try:
        server.wait_ready("m", timeout=180)
        url = server.config.url("inference") + "/predictions/m"
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {server.keys().inference}"

        @settings(max_examples=examples, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(payload=bad_payloads)
        def send(payload) -> None:
            counts["cases"] += 1
            try:
                if isinstance(payload, (bytes, str)):
                    resp = session.post(url, data=payload, timeout=30)
                else:  # json.dumps writes NaN and Infinity, as some clients do (requests' json= refuses them)
                    resp = session.post(url, data=json.dumps(payload), timeout=30,
                                        headers={"Content-Type": "application/json"})
            except requests.RequestException as err:  # a hang or a dropped connection is a failure, counted
                counts["other"] += 1
                others.append(f"{type(err).__name__} for {payload!r:.80}")
                return
            if resp.status_code == 400 and resp.text:
                counts["answered_400"] += 1
            else:
                counts["other"] += 1
                others.append(f"{resp.status_code}: {resp.text[:160]}")

        warm = session.post(url, data=good_images.example(), timeout=120)  # the first answer loads the worker
        counts["good_image_before"] = warm.status_code
        started = time.perf_counter()
        hypothesis_seed(seed)(send)()
        good = session.post(url, data=good_images.example(), timeout=30)
        counts["seconds"] = round(time.perf_counter() - started, 1)
        counts["good_image_after"] = good.status_code
    finally:
        server.stop()
    return {**counts, "others": others[:10]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="schemathesis examples per operation and phase")
    parser.add_argument("--predict-examples", type=int, default=400, help="payloads POSTed to TorchServe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torchserve", action="store_true", help="fuzz only the extension")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    with tempfile.TemporaryDirectory(prefix="tmu-fuzz-") as tmp:
        folder = Path(tmp)
        extension = _workspace(folder / "extension")
        results = {"extension": fuzz_extension(extension, args.examples, args.seed, folder / "st-report.json")}
        if not args.no_torchserve:
            served = _workspace(folder / "torchserve")
            results["torchserve"] = fuzz_torchserve(served, args.predict_examples, args.seed)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    failed = results["extension"]["exit"] != 0 or results.get("torchserve", {}).get("other", 0) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
