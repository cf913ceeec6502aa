"""Entry point of a job worker process: ``python -m tmu_core.forget.worker --job ID --home H --model-store M``.

The dispatcher starts one per job. The worker runs the pipeline for that job (a forget job's, or a retrain job's,
:mod:`tmu_core.forget.retrain`) on ``--device`` (``auto``: the GPU
when there is one) and exits 0 when the job succeeded, 1 otherwise: the job failed for good, was queued again,
or is still ``running`` after its commit, to be resumed (the reason is on the job). A job whose commit already
landed only runs the steps after it. The ``--kill-at STEP`` flag is a test-only hook: the worker calls
``os._exit(9)`` at the start of STEP in the job's first attempt.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tmu_core.config import Workspace, use_private_umask


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from tmu_core.forget.drift import add_policy_flags
    from tmu_core.forget.executor import add_executor_flags
    from tmu_core.forget.pipeline import KILL_POINTS

    parser = argparse.ArgumentParser(prog="python -m tmu_core.forget.worker", description=__doc__)
    parser.add_argument("--job", required=True, help="the job id (already claimed: state running)")
    parser.add_argument("--home", required=True, type=Path, help="workspace folder")
    parser.add_argument("--model-store", required=True, type=Path, help="TorchServe model store")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--retention-s", type=float, default=0.0,
                        help="seconds a superseded version's files are kept (0: deleted when the job finishes)")
    parser.add_argument("--max-attempts", type=int, default=5, help="tries of a job that fails before its commit")
    add_policy_flags(parser)
    add_executor_flags(parser)
    parser.add_argument("--kill-at", choices=KILL_POINTS, default=None,
                        help="test only: exit 9 at this step of the job's first attempt")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one job; the exit code says whether it succeeded."""
    use_private_umask()  # checkpoints, archives, reports and logs it writes are owner-only
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tmu_core.forget.drift import policy_from
    from tmu_core.forget.executor import executor_from
    from tmu_core.forget.pipeline import PipelineConfig, run_job
    from tmu_core.forget.retrain import run_retrain
    from tmu_core.state.jobs import JobStore

    workspace = Workspace(home=args.home, model_store=args.model_store)
    config = PipelineConfig(device=args.device, kill_at=args.kill_at, retention_s=args.retention_s,
                            max_attempts=args.max_attempts, drift=policy_from(args),
                            executor=executor_from(args))
    kind = JobStore(workspace.state_db).get(args.job).kind
    job = (run_retrain if kind == "retrain" else run_job)(workspace, args.job, config)
    logging.getLogger(__name__).info("job=%s ends as %s at step %s: %s", job.id, job.state, job.step,
                                     job.reason or "")
    return 0 if job.state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
