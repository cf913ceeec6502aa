"""``tmu-admin``: the command-line tool. The only package that imports click.

Each command wraps one ``tmu_core`` call; a ``TmuError`` becomes a ``click.ClickException`` (exit 1).
Commands are grouped by concern in the modules of this package and attached here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from tmu_core.config import Workspace, use_private_umask


@click.group()
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Workspace folder (default: $TMU_HOME or .tmu).")
@click.option("--model-store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="TorchServe model store (default: $TMU_MODEL_STORE or model_store).")
@click.option("-v", "--verbose", count=True, help="-v for info logs, -vv for debug logs (on stderr).")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, model_store: Path | None, verbose: int) -> None:
    """Serve an image classifier and make it forget training data (Twin Machine Unlearning)."""
    use_private_umask()  # every file a command writes in the workspace and model store is owner-only
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Workspace.from_env(home=home, model_store=model_store)


def _attach() -> None:
    # Sub-command modules import ``cli`` from here, so they are attached after it exists.
    from tmu_core.cli import commands  # noqa: F401


_attach()
