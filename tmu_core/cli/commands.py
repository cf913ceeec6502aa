"""Imports every command module so that its commands attach to the ``tmu-admin`` group."""

from tmu_core.cli import index_cmd  # noqa: F401
