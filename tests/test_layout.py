"""The package's import rules: the library never loads TorchServe's ``ts`` nor ``click``."""

import subprocess
import sys


def test_import_tmu_core_loads_neither_ts_nor_click():
    code = (
        "import sys, tmu_core, tmu_core.errors, tmu_core.config, tmu_core.device, tmu_core.index\n"
        "import tmu_core.models, tmu_core.train, tmu_core.unlearn, tmu_core.evaluate, tmu_core.serving\n"
        "import tmu_core.service.app, tmu_core.forget.pipeline, tmu_core.service.stack\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ts', 'click'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_group_lists_its_commands():
    from click.testing import CliRunner

    from tmu_core.cli import cli

    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output
