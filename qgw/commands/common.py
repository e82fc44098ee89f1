"""What every subcommand shares: the console and turning known errors into exit codes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

from keyclient.errors import KeySupplyError
from qgw.errors import QgwError

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Known errors end the command with their message and exit code 1, no traceback."""
    try:
        yield
    except (QgwError, KeySupplyError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
