"""`qgw gateway`: the protected services (one subcommand per gateway)."""

from __future__ import annotations

import typer

from gateways.base import registry
from qgw.commands.common import console

app = typer.Typer(help="Run a QKD-keyed gateway.", no_args_is_help=True)


@app.command("list")
def list_gateways() -> None:
    """List the gateways this installation has (built in and plugins)."""
    found = registry()
    if not found:
        console.print("No gateways are installed yet.")
    for name, entry in sorted(found.items()):
        console.print(f"{name}: {entry.summary}")
