"""``tmu-admin package``, ``tmu-admin serve start|stop|status`` and ``tmu-admin predict``."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import click

from tmu_core.cli import cli
from tmu_core.cli.common import drift_options, drift_policy, echo_json, executor_options, executor_settings, tmu_errors
from tmu_core.config import Workspace
from tmu_core.serving.archive import package_version
from tmu_core.state.versions import VersionRegistry
from tmu_core.cli.forget_cmd import RETENTION_HELP
from tmu_core.forget.dispatcher import WorkerSettings
from tmu_core.service.rollback import parse_duration
from tmu_core.service.server import ServiceConfig
from tmu_core.service.server import status as extension_status
from tmu_core.service.stack import start_ray_stack, start_stack, stop_stack
from tmu_core.serving.backend import BackendSpec, free_port, load_or_create_token, read_backend
from tmu_core.serving.clients import InferenceClient
from tmu_core.serving.torchserve import TorchServe, TorchServeConfig

logger = logging.getLogger(__name__)


@cli.command("package")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_name", required=True, help="TorchServe model name (letters, digits, _ and -).")
@click.option("--version", type=click.IntRange(min=1), default=None,
              help="Version number (default: the registry's next version).")
@click.option("--backend", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
              help="What the handler runs: the checked ONNX copy or the torch checkpoint.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="TorchServe batch size.")
@click.option("--max-batch-delay", type=click.IntRange(min=0), default=20, show_default=True,
              help="Milliseconds TorchServe waits to fill a batch.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Classes per answer (capped at the number of classes).")
@click.option("--trained-on", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="File of the sample ids CHECKPOINT was trained on, one a line (default: the index's whole "
                   "training split, checked against the checkpoint's fingerprint).")
@click.pass_obj
def package(workspace: Workspace, checkpoint: Path, model_name: str, version: int | None, backend: str,
            batch_size: int, max_batch_delay: int, top_k: int, trained_on: Path | None) -> None:
    """Export CHECKPOINT to ONNX, check it, and write <model_store>/<model>-v<N>.mar."""
    from tmu_core.service.publish import read_manifest, record_package, training_ids

    with tmu_errors():
        members = training_ids(workspace, checkpoint, read_manifest(trained_on) if trained_on else None)
        version = VersionRegistry(workspace.state_db).reserve(model_name, "package", version)
        result = package_version(checkpoint, workspace, model_name, version, backend=backend,
                                 batch_size=batch_size, max_batch_delay=max_batch_delay, top_k=top_k)
        record_package(workspace, result, members)
    echo_json({"model": result.model, "version": result.version, "archive": str(result.archive),
               "checkpoint": str(result.checkpoint), "onnx": str(result.onnx), "sha256": result.sha256s,
               "onnx_max_abs_diff": result.onnx_check.max_abs_diff})


def _server(workspace: Workspace, config_path: Path | None = None) -> TorchServe:
    """The workspace's server: the settings it was started with, else ``config_path``, else defaults."""
    written = workspace.serve_dir / "config.properties"
    source = written if written.is_file() and config_path is None else config_path
    if source is None and Path("config.properties").is_file():
        source = Path("config.properties")
    if source is None:
        return TorchServe(workspace, TorchServeConfig(model_store=workspace.model_store))
    return TorchServe(workspace, TorchServeConfig.from_properties(source, workspace.model_store))


@cli.group("serve")
def serve_group() -> None:
    """Start, stop and inspect the workspace's TorchServe server."""


def serving_backend_options(func):
    """``--backend``, ``--replicas`` and ``--http-port`` of ``serve start`` (the cluster is ``--ray-address``,
    shared with ``--executor ray``)."""
    func = click.option("--http-port", type=click.IntRange(1, 65535), default=None,
                        help="Ray Serve's HTTP port on 127.0.0.1 (default: a free port).")(func)
    func = click.option("--replicas", type=click.IntRange(min=1), default=None,
                        help="Ray Serve replicas per model, spread over the cluster's nodes (default: the "
                             "workspace's backend.json, else 2).")(func)
    return click.option("--backend", type=click.Choice(["torchserve", "ray"]), default="torchserve",
                        show_default=True, help="What serves the models: TorchServe here, or Ray Serve on a Ray "
                                                "cluster.")(func)


def _ray_spec(workspace: Workspace, ray_address: str | None, replicas: int | None,
              http_port: int | None) -> BackendSpec:
    """The Ray backend asked for. The other settings of an earlier ``backend.json`` for the same cluster are kept
    (its port too, when none is given), so a reader may write the file by hand first (see docs/ray.md)."""
    if not ray_address:
        raise click.UsageError("--backend ray needs --ray-address (the Ray cluster's address, host:port)")
    earlier = read_backend(workspace.serve_dir)
    if earlier.kind == "ray" and earlier.address == ray_address:
        return replace(earlier, replicas=replicas or earlier.replicas, http_port=http_port or earlier.http_port)
    return BackendSpec(kind="ray", address=ray_address, replicas=replicas or 2, http_port=http_port or free_port())


def _ray_started_json(started) -> dict:
    return {"backend": "ray", "inference_url": f"{started.url}/predictions", "token_file": str(started.token_file),
            "models": started.versions, "replicas": started.replicas,
            "extension_url": started.extension.url if started.extension else None,
            "extension_key_file": str(started.extension.key_file) if started.extension else None,
            "started": list(started.started)}


@serve_group.command("start")
@click.option("--model", "models", multiple=True,
              help="Model to serve (repeatable): the registry's serving version, else its newest archive. "
                   "Default: every archived model.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="TorchServe config.properties for ports and switches (default: ./config.properties).")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for each model's worker to become READY.")
@click.option("--no-extension", is_flag=True, help="Start TorchServe only, not the management extension.")
@click.option("--retention", default="0s", show_default=True, help=RETENTION_HELP)
@drift_options
@executor_options
@serving_backend_options
@click.pass_obj
def serve_start(workspace: Workspace, models: tuple[str, ...], config_path: Path | None, timeout: float,
                no_extension: bool, retention: str, drift_budget: str, retrain_after_forgets: int | None,
                retrain_after: str | None, drift_hold: str, drift_confidence: float, executor: str,
                ray_address: str | None, ray_num_cpus: float, ray_num_gpus: float | None, backend: str,
                replicas: int | None, http_port: int | None) -> None:
    """Start what is not running of TorchServe and the management extension; wait until every model is READY.

    A TorchServe that runs is kept (a model it lacks is registered); one that died is started again with each
    model's serving version while a running extension keeps running. Starting everything twice is a no-op.
    With --backend ray, each model's serving version is deployed on Ray Serve on the cluster at --ray-address
    instead, and later swaps and rollbacks go there.
    """
    with tmu_errors():
        worker = WorkerSettings(retention_s=parse_duration(retention).total_seconds(),
                                drift=drift_policy(drift_budget, retrain_after_forgets, retrain_after, drift_hold,
                                                   drift_confidence),
                                executor=executor_settings(executor, ray_address, ray_num_cpus, ray_num_gpus))
        if backend == "ray":
            spec = _ray_spec(workspace, ray_address, replicas, http_port)
            ray_started = start_ray_stack(workspace, spec, list(models) or None, with_extension=not no_extension,
                                          service=ServiceConfig(worker=worker))
            echo_json(_ray_started_json(ray_started))
            return
        if config_path is None and Path("config.properties").is_file():
            config_path = Path("config.properties")
        config = (TorchServeConfig.from_properties(config_path, workspace.model_store) if config_path
                  else TorchServeConfig(model_store=workspace.model_store))
        started = start_stack(workspace, config, list(models) or None, with_extension=not no_extension,
                              timeout=timeout, service=ServiceConfig(worker=worker))
    status, ext = started.torchserve, started.extension
    echo_json({"inference_url": status.inference_url, "management_url": status.management_url,
               "metrics_url": status.metrics_url, "key_file": str(status.key_file) if status.key_file else None,
               "logs": str(status.log_dir), "pid": status.pid, "models": started.versions,
               "extension_url": ext.url if ext else None,
               "extension_key_file": str(ext.key_file) if ext else None, "started": list(started.started)})


@serve_group.command("stop")
@click.pass_obj
def serve_stop(workspace: Workspace) -> None:
    """Stop the extension, then TorchServe, waiting until its Java process has exited (with Ray Serve: delete
    the workspace's Serve applications; the cluster keeps running)."""
    with tmu_errors():
        kind = read_backend(workspace.serve_dir).kind
        ext_was_running, ts_was_running = stop_stack(workspace, _server(workspace))
    click.echo("extension stopped." if ext_was_running else "extension was not running.")
    if kind == "ray":
        click.echo("Ray Serve applications deleted." if ts_was_running else "Ray Serve served nothing.")
        return
    click.echo("TorchServe stopped." if ts_was_running else "TorchServe was not running.")


@serve_group.command("status")
@click.pass_obj
def serve_status(workspace: Workspace) -> None:
    """Whether TorchServe and the extension run, their URLs, key files and models."""
    with tmu_errors():
        spec = read_backend(workspace.serve_dir)
        ext = extension_status(workspace)
        if spec.kind == "ray":
            echo_json({"ray_serve": asdict(spec), "extension": asdict(ext) if ext else None})
            return
        status = _server(workspace).status()
    echo_json({"torchserve": asdict(status), "extension": asdict(ext) if ext else None})


@cli.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_name", required=True, help="Served model name.")
@click.option("--version", default=None, help="Model version (default: TorchServe's default version).")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Show at most K classes (the archive's top_k is the upper bound).")
@click.pass_obj
def predict(workspace: Workspace, images: tuple[Path, ...], model_name: str, version: str | None,
            top_k: int | None) -> None:
    """Classify IMAGES (JPEG or PNG files) with the running TorchServe (or Ray Serve)."""
    with tmu_errors():
        spec = read_backend(workspace.serve_dir)
        if spec.kind == "ray":  # same path and answers; the token is Ray Serve's own
            client = InferenceClient(spec.url, load_or_create_token(workspace.serve_dir))
        else:
            client = _server(workspace).inference()  # follows key_file.json, renewing an expired key
        answers = []
        for path in images:
            result = client.predict(model_name, path.read_bytes(), version=version)
            shown = result.predictions[:top_k] if top_k else result.predictions
            answers.append({"image": str(path), "model_version": result.model_version,
                            "predictions": [{"class": p.name, "index": p.index, "probability": p.probability}
                                            for p in shown]})
    echo_json(answers)
