"""``tmu-admin audit``: print the audit log, print its head, or check its chain against a head.

Works on the state database directly (no running service needed).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from tmu_core.cli import cli
from tmu_core.cli.common import tmu_errors
from tmu_core.config import Workspace
from tmu_core.errors import InvalidInputError

if TYPE_CHECKING:
    from tmu_core.state.audit import AuditHead, AuditLog


def _parse_head_option(ctx: click.Context, param: click.Parameter, value: str | None) -> AuditHead | None:
    from tmu_core.state.audit import parse_head

    if value is None:
        return None
    try:
        return parse_head(value)
    except InvalidInputError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err


@cli.command("audit")
@click.option("--verify", is_flag=True, help="Walk the hash chain and check it against the head.")
@click.option("--head", "head", default=None, callback=_parse_head_option, metavar="SEQ:HASH",
              help="With --verify: check against this head, kept outside the workspace, instead of audit.head.")
@click.option("--show-head", is_flag=True, help="Print the last record's SEQ:HASH, to keep elsewhere.")
@click.option("--model", default=None, help="Only this model's records.")
@click.pass_obj
def audit(workspace: Workspace, verify: bool, head: AuditHead | None, show_head: bool, model: str | None) -> None:
    """Print the audit log (one JSON record per line), its head with --show-head, or check it with --verify."""
    from tmu_core.state.audit import AuditLog

    if head is not None and not verify:
        raise click.UsageError("--head is only used with --verify: tmu-admin audit --verify --head SEQ:HASH")
    if verify and show_head:
        raise click.UsageError("--verify and --show-head cannot be combined; give one of them")
    with tmu_errors():
        log = AuditLog(workspace.state_db)
        if verify:
            _verify(log, head)
        elif show_head:
            click.echo(str(log.head()))
        else:
            for record in log.records(model=model):
                row = {**record.body(), "samples": len(record.sample_hashes), "hash": record.hash}
                row.pop("sample_hashes")
                click.echo(json.dumps(row, sort_keys=True))


def _verify(log: AuditLog, head: AuditHead | None) -> None:
    verdict = log.verify(head)
    if not verdict.ok:
        raise click.ClickException(f"audit log broken at record {verdict.broken_seq}: {verdict.reason}")
    click.echo(f"audit log OK: {verdict.records} records, hash chain intact; {verdict.note}")
