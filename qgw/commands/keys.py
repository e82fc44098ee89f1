"""`qgw keys`: the ETSI 014 key client as a command, for operators checking a KME.

Key bytes are never printed: `get` and `dec` show key IDs and sizes; `--out`
writes the keys to a new 0600 JSON file for whoever really needs them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from keyclient import Etsi014Client, Key
from qgw.commands.common import console, friendly_errors
from qgw.errors import QgwError
from qgw.pki import Pki
from qgw.tls import TlsFiles, write_private

app = typer.Typer(help="Talk to a KME as an SAE (ETSI GS QKD 014).", no_args_is_help=True)

KmeUrl = Annotated[str, typer.Option("--kme", envvar="QGW_KME_URL",
                                     help="KME base URL, e.g. https://localhost:8443.")]
PkiDir = Annotated[Path, typer.Option("--pki", envvar="QGW_PKI",
                                      help="PKI folder made by `qgw pki init`.")]
SaeId = Annotated[str | None, typer.Option("--sae", envvar="QGW_SAE",
                                           help="This SAE's ID (its certificate in --pki).")]
Cert = Annotated[Path | None, typer.Option(help="Client certificate (instead of --pki/--sae).")]
KeyFile = Annotated[Path | None, typer.Option("--key", help="Client private key.")]
Ca = Annotated[Path | None, typer.Option(help="CA certificate of the KME.")]
Out = Annotated[Path | None, typer.Option(
    "--out", help="Write the keys (base64) to this new file, mode 0600.")]


def _client(kme: str, pki: Path, sae: str | None, cert: Path | None, key: Path | None,
            ca: Path | None) -> Etsi014Client:
    if cert or key:
        if not (cert and key):
            raise QgwError("--cert and --key go together")
        files = TlsFiles(ca or pki / "ca.pem", cert, key)
    elif sae:
        files = Pki(pki).sae_files(sae)
    else:
        raise QgwError("say who you are: --sae SAE_ID (with --pki) or --cert/--key")
    return Etsi014Client(kme, files)


def _show(keys: list[Key], out: Path | None) -> None:
    table = Table()
    table.add_column("key_ID")
    table.add_column("bits", justify="right")
    for k in keys:
        table.add_row(k.key_id, str(k.bits))
    console.print(table)
    if out is not None:
        if out.exists():
            raise QgwError(f"{out} exists; not overwriting key material")
        data = [{"key_ID": k.key_id, "key": base64.b64encode(k.secret.expose()).decode()}
                for k in keys]
        write_private(out, json.dumps({"keys": data}).encode())
        console.print(f"keys written to {out} (mode 0600)")


@app.command("status")
def status(slave_sae_id: str, kme: KmeUrl, pki: PkiDir = Path(".qgw/pki"), sae: SaeId = None,
           cert: Cert = None, key: KeyFile = None, ca: Ca = None) -> None:
    """Show the key status between this (master) SAE and SLAVE_SAE_ID."""
    with friendly_errors(), _client(kme, pki, sae, cert, key, ca) as client:
        st = client.status(slave_sae_id)
    table = Table(title=f"{st.source_KME_ID} -> {st.target_KME_ID}")
    table.add_column("field")
    table.add_column("value")
    for name, value in vars(st).items():
        table.add_row(name, json.dumps(value) if isinstance(value, dict) else str(value))
    console.print(table)


@app.command("get")
def get(slave_sae_id: str, kme: KmeUrl, pki: PkiDir = Path(".qgw/pki"), sae: SaeId = None,
        number: Annotated[int, typer.Option("--number", "-n", help="How many keys.")] = 1,
        size: Annotated[int | None, typer.Option(help="Key size in bits.")] = None,
        also: Annotated[list[str], typer.Option(
            "--also", help="An additional slave SAE (key multicast). Repeat.")] = [],  # noqa: B006
        cert: Cert = None, key: KeyFile = None, ca: Ca = None, out: Out = None) -> None:
    """Get new keys (enc_keys) shared with SLAVE_SAE_ID; prints their key IDs."""
    with friendly_errors(), _client(kme, pki, sae, cert, key, ca) as client:
        keys = client.get_keys(slave_sae_id, number, size, additional_slave_sae_ids=also)
        _show(keys, out)


@app.command("dec")
def dec(master_sae_id: str, key_ids: Annotated[list[str], typer.Argument(help="Key IDs.")],
        kme: KmeUrl, pki: PkiDir = Path(".qgw/pki"), sae: SaeId = None, cert: Cert = None,
        key: KeyFile = None, ca: Ca = None, out: Out = None) -> None:
    """Fetch keys by ID (dec_keys) that MASTER_SAE_ID obtained for this SAE."""
    with friendly_errors(), _client(kme, pki, sae, cert, key, ca) as client:
        keys = client.get_keys_with_ids(master_sae_id, key_ids)
        _show(keys, out)
