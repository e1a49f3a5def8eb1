"""One error policy for the fedmoe command-line entry points: a FedmoeError is a one-line message, not a traceback."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from device_runtime.errors import FedmoeError

if TYPE_CHECKING:
    import click
    from rich.console import Console


def run_cli(group: click.Group, console: Console) -> None:
    """Run ``group`` on ``sys.argv`` (click standalone mode); on FedmoeError print ``error: <message>`` to
    ``console`` and exit with status 1.

    Raises:
        SystemExit: always (click's own exit status, or 1 after a FedmoeError).
    """
    try:
        group(standalone_mode=True)
    except FedmoeError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(1)
