"""`qgw pki`: certificates for KMEs and SAEs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qgw.commands.common import console, friendly_errors
from qgw.pki import KmeSpec, SaeSpec, init_pki

app = typer.Typer(help="Make the certificates of a simulated QKD network.", no_args_is_help=True)


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the CA, certificates and keys.")],
    kme: Annotated[list[str], typer.Option(
        "--kme", help="A KME: KME_ID or KME_ID=host1,10.0.0.5 (extra names or IPs). Repeat.")] = [],  # noqa: B006
    sae: Annotated[list[str], typer.Option(
        "--sae", help="An SAE and its KME: SAE_ID@KME_ID. Repeat.")] = [],  # noqa: B006
) -> None:
    """Create a CA, a server+client certificate per KME and a client certificate per SAE.

    Running it again keeps what exists and adds what is missing. Private keys are 0600.
    """
    with friendly_errors():
        report = init_pki(directory, [KmeSpec.parse(k) for k in kme],
                          [SaeSpec.parse(s) for s in sae])
    for item in report.created:
        console.print(f"[green]created[/] {item}")
    for item in report.kept:
        console.print(f"[dim]kept[/]    {item}")
    console.print(f"PKI in [bold]{directory}[/]", soft_wrap=True)
