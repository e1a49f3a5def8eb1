"""``device_runtime.cli_errors.run_cli``: a FedmoeError is one line on stderr and exit status 1, in every CLI."""

import io
import os
import subprocess
import sys

import click
import pytest
from rich.console import Console

from device_runtime.cli_errors import run_cli
from device_runtime.errors import ConfigError


@click.group()
def group():
    """A CLI with one failing, one crashing and one working command."""


@group.command()
def fail():
    raise ConfigError("port 70000 is not in [0, 65535]")


@group.command()
def crash():
    raise ValueError("a bug, not a user error")


@group.command()
def ok():
    click.echo("fine")


def run(monkeypatch, *argv) -> tuple[int, str]:
    """``(exit status, console text)`` of ``run_cli(group)`` on ``argv``."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    with pytest.raises(SystemExit) as exited:
        run_cli(group, Console(file=out, width=200, color_system=None))
    return exited.value.code, out.getvalue()


def test_fedmoe_error_is_one_line_and_status_1(monkeypatch):
    assert run(monkeypatch, "fail") == (1, "error: port 70000 is not in [0, 65535]\n")


def test_success_and_usage_errors_keep_clicks_exit_status(monkeypatch, capsys):
    assert run(monkeypatch, "ok") == (0, "")
    assert capsys.readouterr().out == "fine\n"
    assert run(monkeypatch, "nope") == (2, "")  # click's usage error
    assert "No such command" in capsys.readouterr().err


def test_other_exceptions_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "crash"])
    with pytest.raises(ValueError, match="a bug"):
        run_cli(group, Console(file=io.StringIO()))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["coordinator.cli", "--config", "{tmp}/missing.toml", "status"], "cannot read config"),
        (["export.cli", "inspect", "{tmp}"], "is not a bundle"),
    ],
)
def test_entry_points_print_one_error_line(tmp_path, argv, message):
    args = [a.format(tmp=tmp_path) for a in argv]
    code = f"import sys; sys.argv = {args!r}; from {args[0]} import run; run()"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "400"}
    )
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr
