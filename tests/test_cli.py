"""The ``mpsdata`` command line: ``--version`` and ``--help`` (the subcommands have their own tests)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

import mpsdata
from mpsdata import cli


def test_module_version_in_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mpsdata.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mpsdata {mpsdata.__version__}"


def test_console_script_points_at_main() -> None:
    # Running the script would cost another interpreter start (torch import); check what it runs instead.
    scripts = importlib.metadata.entry_points(group="console_scripts", name="mpsdata")
    assert len(scripts) == 1, "the mpsdata console script is not installed (pip install -e .)"
    assert next(iter(scripts)).load() is cli.main


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mpsdata {mpsdata.__version__}"


def test_help_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mpsdata")
    assert "matrix product states" in out


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    assert capsys.readouterr().out.startswith("usage: mpsdata")


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--no-such-option"])
    assert info.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_version_matches_the_installed_metadata() -> None:
    assert importlib.metadata.version("mpsdata") == mpsdata.__version__
