"""Imports every command module so that its commands attach to the ``tmu-admin`` group."""

from tmu_core.cli import (  # noqa: F401
    audit_cmd,
    evaluate_cmd,
    forget_cmd,
    import_cmd,
    index_cmd,
    quickstart_cmd,
    serve_cmd,
    train_cmd,
)
