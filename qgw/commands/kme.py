"""`qgw kme`: run one KME, or a whole simulated network."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kme import config as kme_config
from kme.network import LocalNetwork, default_network, prepare
from qgw import logs
from qgw.commands.common import console, friendly_errors

app = typer.Typer(help="KME simulator (ETSI GS QKD 014 over mutual TLS).", no_args_is_help=True)


@app.command("serve")
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="KME config file (YAML).")],
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run one KME until SIGTERM or Ctrl-C."""
    from kme.run import run

    logs.setup(log_level)
    with friendly_errors():
        cfg = kme_config.load(config)
        run(cfg)


@app.command("up")
def up(
    state: Annotated[Path, typer.Option(help="Folder for PKI, configs, stores and logs.")] =
        Path(".qgw"),
    port: Annotated[int, typer.Option(help="HTTPS port of the first KME; the next use +1.")] =
        8443,
    metrics_port: Annotated[int, typer.Option(
        help="Metrics port of the first KME (/metrics, /health); the next use +1.")] = 9443,
    key_rate: Annotated[float | None, typer.Option(
        help="Link secret key rate in bit/s (default: 8400, UC33 Norte-Distrito).")] = None,
) -> None:
    """Run the embedded network (two KMEs, two SAEs) on this machine until Ctrl-C.

    Certificates are generated on first run in STATE/pki and kept afterwards.
    """
    logs.setup()
    spec = default_network()
    if key_rate is not None:
        spec.links = [type(link)(link.a, link.b, key_rate, link.loss_db) for link in spec.links]
    with friendly_errors():
        endpoints = prepare(state, spec, base_port=port, metrics_base_port=metrics_port)
        with LocalNetwork(endpoints, state / "logs"):
            table = Table(title="Simulated QKD network")
            for col in ("KME", "ETSI 014 URL", "metrics", "SAEs"):
                table.add_column(col)
            for ep in endpoints.values():
                saes = ", ".join(s for s, k in spec.saes.items() if k == ep.kme_id)
                table.add_row(ep.kme_id, ep.url, ep.metrics_url + "/metrics", saes)
            console.print(table)
            console.print(f"SAE certificates: {state / 'pki' / 'sae'}; logs: {state / 'logs'}")
            console.print("Press Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                console.print("stopping")
