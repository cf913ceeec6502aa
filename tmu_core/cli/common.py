"""Helpers shared by the command modules: error mapping and id-list parsing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from typing import Any

import click

from tmu_core.errors import TmuError


@contextlib.contextmanager
def tmu_errors() -> Iterator[None]:
    """Turn a ``TmuError`` into a ``click.ClickException`` (exit 1) with the error's own message."""
    try:
        yield
    except TmuError as err:
        raise click.ClickException(str(err)) from err


def parse_list(text: str | None) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; ``None`` or blank -> ``[]``."""
    if not text:
        return []
    return [part.strip() for part in text.split(",") if part.strip()]


def echo_json(value: Any) -> None:
    """Print a dataclass, list or dict as indented JSON on stdout."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    click.echo(json.dumps(value, indent=2, default=str))
