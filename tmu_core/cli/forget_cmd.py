"""``tmu-admin forget|jobs|versions|report|rollback|audit|purge|prepare`` and ``tmu-admin extension start|stop|status``.

forget, jobs, versions and rollback talk to the running extension service over HTTP (url and key from the
workspace); report reads the job over HTTP and its files from the workspace; audit and purge work on the state
database directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tmu_core.cli import cli
from tmu_core.cli.common import drift_options, drift_policy, echo_json, executor_options, executor_settings, parse_list, tmu_errors
from tmu_core.config import Workspace


RETENTION_HELP = ("How long the archive, checkpoint and ONNX copy of a version that holds forgotten samples are "
                  "kept after it stops serving, for a rollback (e.g. 0s, 12h, 7d; 0s deletes them when the forget "
                  "job finishes).")


def _client(workspace: Workspace) -> Any:
    from tmu_core.service.client import ExtensionClient

    return ExtensionClient.from_workspace(workspace)


def wait_with_bar(client: Any, job_id: str, timeout: float) -> dict[str, Any]:
    """Poll a job with a progress bar on stderr until it finishes; return the final job."""
    from tqdm import tqdm

    with tqdm(total=100, desc=job_id, unit="%", file=click.get_text_stream("stderr"),
              bar_format="{desc} {bar} {n:.0f}% {postfix}") as bar:
        def update(job: dict[str, Any]) -> None:
            bar.n = round(100 * float(job.get("progress") or 0.0))
            bar.set_postfix_str(f"{job['state']} {job.get('step') or ''}")
            bar.refresh()

        return client.wait(job_id, timeout=timeout, on_update=update)


@cli.command("forget")
@click.argument("model", required=False)
@click.option("--samples", default=None, help="Comma-separated training sample ids, e.g. train/cat/0001,train/cat/0002")
@click.option("--owners", default=None, help="Comma-separated data owner ids: all their training samples.")
@click.option("--wait", is_flag=True, help="Show a progress bar until the job finishes.")
@click.option("--noise", type=click.FloatRange(min=0), default=None,
              help="TMU's Gaussian noise on predicted-easy samples (pixel units, 0..255).")
@click.option("--method", default="tmu", show_default=True, help="Unlearning method.")
@click.option("--idempotency-key", default=None, help="Resubmitting with the same key returns the same job.")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600, show_default=True,
              help="Seconds --wait waits.")
@click.pass_obj
def forget(workspace: Workspace, model: str | None, samples: str | None, owners: str | None, wait: bool,
           noise: float | None, method: str, idempotency_key: str | None, timeout: float) -> None:
    """Forget samples or data owners in every model trained on them, or in MODEL only; prints the request
    (and, with --wait, each model's report when all are done)."""
    sample_ids, owner_ids = parse_list(samples), parse_list(owners)
    if not sample_ids and not owner_ids:
        raise click.UsageError("give --samples or --owners (or both)")
    options = {"noise_std": noise} if noise is not None else {}
    with tmu_errors():
        client = _client(workspace)
        accepted = client.forget(model, sample_ids, owner_ids, idempotency_key, method, options)
        if not wait or accepted.get("request_id") is None:
            echo_json(accepted)
            return
        for entry in accepted["jobs"]:
            wait_with_bar(client, entry["job_id"], timeout)
        view = client.wait_request(accepted["request_id"], timeout=timeout)
        jobs = [client.job(entry["job_id"]) for entry in view["jobs"]]
    for job in jobs:
        _show_finished(workspace, job)
    if view["state"] != "succeeded":
        raise click.ClickException(f"forget request {view['request_id']} is {view['state']}")
    pixels = (f"{view['pending_wipe']} sample(s) wait for another model before their pixels are wiped"
              if view["pending_wipe"] else "every sample's pixels wiped")
    click.echo(f"request {view['request_id']} succeeded: {len(jobs)} model(s) unlearned, {pixels}")


def _show_finished(workspace: Workspace, job: dict[str, Any]) -> None:
    if job["state"] == "failed":
        raise click.ClickException(f"job {job['id']} failed: {job.get('reason')}")
    result = job.get("result") or {}
    if result.get("metrics"):
        from tmu_core.forget.report import format_report

        click.echo(format_report(result))
        click.echo(f"report: {_report_png(workspace, job)}")
    else:
        click.echo(f"job {job['id']} succeeded: {job.get('reason') or 'done'}")


def _report_png(workspace: Workspace, job: dict[str, Any]) -> Path:
    from tmu_core.forget.report import REPORT_PNG

    return workspace.version_dir(job["model"], job["to_version"]) / REPORT_PNG


@cli.command("jobs")
@click.argument("job_id", required=False)
@click.option("--model", default=None, help="Only this model's jobs.")
@click.option("--state", type=click.Choice(["queued", "running", "succeeded", "failed"]), default=None)
@click.pass_obj
def jobs(workspace: Workspace, job_id: str | None, model: str | None, state: str | None) -> None:
    """Show one job as JSON, or list jobs (newest first)."""
    with tmu_errors():
        client = _client(workspace)
        if job_id:
            echo_json(client.job(job_id))
            return
        rows = client.jobs(model=model, state=state)
    click.echo(f"{'job':<16}{'model':<14}{'state':<11}{'step':<16}{'progress':>8}  {'versions':<9} reason")
    for job in rows:
        versions = f"{job.get('from_version') or '-'}->{job.get('to_version') or '-'}"
        click.echo(f"{job['id']:<16}{job['model']:<14}{job['state']:<11}{(job.get('step') or '-'):<16}"
                   f"{100 * job['progress']:>7.0f}%  {versions:<9} {job.get('reason') or ''}")


@cli.command("versions")
@click.argument("model")
@click.pass_obj
def versions(workspace: Workspace, model: str) -> None:
    """List MODEL's versions with their state, lineage and forget request."""
    with tmu_errors():
        body = _client(workspace).versions(model)
    click.echo(f"{'version':<9}{'state':<13}{'kind':<13}{'parent':<8}{'made by':<18}{'trained on':>11}"
               f"{'drift':>13}  {'created':<28}archive")
    for v in body["versions"]:
        size = "-" if v.get("trained_on") is None else str(v["trained_on"])
        drift = (v.get("metrics") or {}).get("drift")
        cost = "-"
        if drift and v.get("kind") == "approximate":
            cost = f"{drift['cost']:+.2f}" + (f"+-{drift['cost_se']:.2f}" if drift.get("cost_se") is not None else "")
        click.echo(f"{v['version']:<9}{v['state']:<13}{v.get('kind', '-'):<13}{str(v['parent'] or '-'):<8}"
                   f"{(v['forget_request'] or '-'):<18}{size:>11}{cost:>13}  {v['created_at'][:26]:<28}"
                   f"{Path(v['archive']).name}")
    click.echo("drift: ACC_Dtest points lost since the lineage's last exact version (+- its standard error on the "
               "eval split)")
    click.echo(f"forgotten samples: {body.get('forgotten', 0)}; owed again after a rollback: "
               f"{body.get('owed', 0)}" + (f" (tmu-admin retrain {model} forgets them again)"
                                           if body.get("owed") else ""))


@cli.command("report")
@click.argument("job_id")
@click.pass_obj
def report(workspace: Workspace, job_id: str) -> None:
    """Print a finished forget job's report table and the path of its PNG figure."""
    with tmu_errors():
        job = _client(workspace).job(job_id)
    if not (job.get("result") or {}).get("metrics"):
        raise click.ClickException(f"job {job_id} is {job['state']} and has no report"
                                   + (f": {job['reason']}" if job.get("reason") else ""))
    _show_finished(workspace, job)


@cli.command("retrain")
@click.argument("model")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs instead of the recorded recipe's.")
@click.option("--wait/--no-wait", default=False, show_default=True, help="Wait until the exact version serves.")
@click.option("--timeout", type=click.FloatRange(min=1), default=24 * 3600.0, show_default=True,
              help="Seconds to wait with --wait.")
@click.pass_obj
def retrain(workspace: Workspace, model: str, epochs: int | None, wait: bool, timeout: float) -> None:
    """Retrain MODEL exactly on its retained samples in the background and serve it as a new version.

    Forget requests go on meanwhile. Samples they forget while it trains are unlearned from the retrained network
    before it serves (the version is then approximate, with a lineage of its own); otherwise it is exact.
    """
    with tmu_errors():
        client = _client(workspace)
        answer = client.retrain(model, epochs)
        if not wait:
            echo_json(answer)
            return
        job = wait_with_bar(client, answer["job_id"], timeout)
    _show_finished(workspace, job)


@cli.command("rollback")
@click.argument("model")
@click.option("--to", "to_version", type=click.IntRange(min=1), required=True, help="Version to serve again.")
@click.option("--undo-forgets", is_flag=True, help="Allow serving a version that predates forget requests.")
@click.pass_obj
def rollback(workspace: Workspace, model: str, to_version: int, undo_forgets: bool) -> None:
    """Serve an earlier version of MODEL again (refused past a forget unless --undo-forgets)."""
    with tmu_errors():
        echo_json(_client(workspace).rollback(model, to_version, undo_forgets))


@cli.command("purge")
@click.option("--older-than", default="7d", show_default=True,
              help="Retention: purge versions superseded longer ago than this (s, m, h, d, w).")
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@click.pass_obj
def purge(workspace: Workspace, older_than: str, dry_run: bool) -> None:
    """Delete archives, checkpoints and artifacts of versions superseded by a forget."""
    from tmu_core.service.rollback import parse_duration, purge as run_purge

    with tmu_errors():
        result = run_purge(workspace, parse_duration(older_than), dry_run=dry_run)
    echo_json(result)


@cli.command("prepare")
@click.argument("model")
@click.option("--version", type=click.IntRange(min=1), default=None, help="Version (default: the serving one).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.pass_obj
def prepare(workspace: Workspace, model: str, version: int | None, device: str) -> None:
    """Prepare MODEL's TMU artifacts ahead of forget requests (jobs do it themselves when missing)."""
    from tmu_core.forget.artifacts import prepare_version

    with tmu_errors():
        seconds = prepare_version(workspace, model, version, device=device)
    click.echo(f"prepared {model} artifacts in {seconds:.1f}s")


@cli.group("extension")
def extension_group() -> None:
    """Start, stop and inspect the management extension (forget requests, jobs, rollback)."""


@extension_group.command("start")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0 picks a free port.")
@click.option("--device", default="auto", show_default=True, help="Where jobs run: auto, cpu, cuda, cuda:N.")
@click.option("--retention", default="0s", show_default=True, help=RETENTION_HELP)
@drift_options
@executor_options
@click.pass_obj
def extension_start(workspace: Workspace, port: int, device: str, retention: str, drift_budget: str,
                    retrain_after_forgets: int | None, retrain_after: str | None, drift_hold: str,
                    drift_confidence: float, executor: str, ray_address: str | None, ray_num_cpus: float,
                    ray_num_gpus: float | None) -> None:
    """Start the extension service in the background (loopback, token in <home>/serve/extension.key)."""
    from tmu_core.forget.dispatcher import WorkerSettings
    from tmu_core.service import server
    from tmu_core.service.rollback import parse_duration

    with tmu_errors():
        worker = WorkerSettings(device=device, retention_s=parse_duration(retention).total_seconds(),
                                drift=drift_policy(drift_budget, retrain_after_forgets, retrain_after, drift_hold,
                                                   drift_confidence),
                                executor=executor_settings(executor, ray_address, ray_num_cpus, ray_num_gpus))
        info = server.start(workspace, server.ServiceConfig(port=port, worker=worker))
    echo_json(info)


@extension_group.command("stop")
@click.pass_obj
def extension_stop(workspace: Workspace) -> None:
    """Stop the extension service (running job workers finish on their own)."""
    from tmu_core.service import server

    click.echo("extension stopped." if server.stop(workspace) else "extension was not running.")


@extension_group.command("status")
@click.pass_obj
def extension_status(workspace: Workspace) -> None:
    """Whether the extension service runs, and where."""
    from tmu_core.service import server

    info = server.status(workspace)
    echo_json({"running": info is not None, **(info.__dict__ if info else {})})
