"""`qgw`: one command for every component (KME simulator, key client, gateways, demo)."""

from __future__ import annotations

import typer

from qgw.commands import demo, gateway, keys, kme, pki

app = typer.Typer(
    name="qgw",
    help="Quantum-secure service gateways keyed by QKD (ETSI GS QKD 014) KMEs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(pki.app, name="pki")
app.add_typer(kme.app, name="kme")
app.add_typer(keys.app, name="keys")
app.add_typer(gateway.app, name="gateway")
app.command("demo")(demo.demo)


@app.callback()
def main() -> None:
    """Quantum-secure service gateways keyed by QKD (ETSI GS QKD 014) KMEs.

    Start with `qgw demo`: it runs a simulated QKD network and a gateway key
    session on this machine and prints its KPIs next to the OPENQKD field trials'.
    """
