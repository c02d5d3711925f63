"""The `longsum` command: help, version, lazy imports, one-line errors."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from longsum import __version__
from longsum.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("convert", "summarize", "eval", "train"):
        assert command in result.output


def test_each_command_help_shows_an_example():
    for command in ("convert", "summarize", "eval", "train"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0
        assert f"longsum {command}" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_does_not_import_torch_or_transformers():
    code = (
        "import sys; from longsum.cli import app; from typer.testing import CliRunner;"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0;"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_errors_are_one_line_without_traceback():
    out = subprocess.run([sys.executable, "-m", "longsum", "train"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr
