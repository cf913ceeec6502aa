"""Entry point of a job worker process: ``python -m tmu_core.forget.worker --job ID --home H --model-store M``.

The dispatcher starts one per job. The worker runs the pipeline for that job on ``--device`` (``auto``: the GPU
when there is one) and exits 0 when the job succeeded, 1 when it failed (the reason is on the job). The
``--kill-at STEP`` flag is a test-only hook: the worker calls ``os._exit(9)`` at the start of STEP.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tmu_core.config import Workspace


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from tmu_core.forget.pipeline import KILL_POINTS

    parser = argparse.ArgumentParser(prog="python -m tmu_core.forget.worker", description=__doc__)
    parser.add_argument("--job", required=True, help="the job id (already claimed: state running)")
    parser.add_argument("--home", required=True, type=Path, help="workspace folder")
    parser.add_argument("--model-store", required=True, type=Path, help="TorchServe model store")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--kill-at", choices=KILL_POINTS, default=None, help="test only: exit 9 at this step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one job; the exit code says whether it succeeded."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tmu_core.forget.pipeline import PipelineConfig, run_job

    workspace = Workspace(home=args.home, model_store=args.model_store)
    job = run_job(workspace, args.job, PipelineConfig(device=args.device, kill_at=args.kill_at))
    logging.getLogger(__name__).info("job=%s finished: %s %s", job.id, job.state, job.reason or "")
    return 0 if job.state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
