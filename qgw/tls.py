"""The one place TLS contexts are built (mutual TLS, TLS 1.2 minimum).

Identity is the verified client certificate: the subject CN names the entity
(KME ID or SAE ID) and the OU its role, so an SAE certificate can never pass for
a KME on the KME-to-KME interface even if the IDs collide.
"""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgw.errors import PkiError

ROLE_KME = "KME"
ROLE_SAE = "SAE"
ROLE_ADMIN = "ADMIN"  # the network operator: may take links down and read the whole network


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Identity:
    name: str
    role: str


def check_key_file(path: Path) -> None:
    """Refuse a private key that is missing or readable by group/others."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise PkiError(f"private key {path} does not exist (run `qgw pki init`)") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PkiError(
            f"private key {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )


def _load(ctx: ssl.SSLContext, files: TlsFiles) -> None:
    for p in (files.ca, files.cert):
        if not p.exists():
            raise PkiError(f"{p} does not exist (run `qgw pki init`)")
    check_key_file(files.key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.verify_mode = ssl.CERT_REQUIRED


def server_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load(ctx, files)
    return ctx


def client_context(files: TlsFiles, *, check_hostname: bool = True) -> ssl.SSLContext:
    """Client side of mutual TLS.

    `check_hostname=False` is for peers identified by certificate CN instead of
    host name (gateway control channels); the chain is still verified and the
    caller must check `peer_identity` against the expected peer.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = check_hostname
    _load(ctx, files)
    return ctx


def peer_identity(peercert: dict[str, Any] | None) -> Identity | None:
    """Identity from `SSLSocket.getpeercert()` of a verified peer."""
    if not peercert:
        return None
    cn = ou = None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
            elif key == "organizationalUnitName":
                ou = value
    if not cn or ou not in (ROLE_KME, ROLE_SAE, ROLE_ADMIN):
        return None
    return Identity(cn, ou)


def write_private(path: Path, data: bytes) -> None:
    """Write a private file created 0600 from the start (no window where it is open)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
