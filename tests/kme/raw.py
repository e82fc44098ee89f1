"""A raw HTTPS client of the KME simulator, so tests see exactly what goes over the wire."""

from __future__ import annotations

import json
import ssl
from typing import Any

import urllib3

from qgw.tls import client_context
from tests.harness import SAES, KmePair


class Raw:
    """One certificate (the SAE's unless `ctx` says otherwise) talking raw HTTPS to one KME
    (the SAE's unless `kme` names another); closed with the KMEs."""

    TIMEOUT_S: float | None = None  # per connect and per read; None waits as long as it takes

    def __init__(self, kmes: KmePair, sae: str, kme: str | None = None, *,
                 ctx: ssl.SSLContext | None = None) -> None:
        port = kmes.ports[kme or SAES[sae]]
        ctx = ctx or client_context(kmes.pki.sae_files(sae))
        self.pool = urllib3.HTTPSConnectionPool("localhost", port, ssl_context=ctx,
                                                retries=False, timeout=self.TIMEOUT_S)
        kmes.on_close(self.pool.close)

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """Send `body` as JSON (or `raw` bytes, or nothing); (HTTP status, the JSON answer)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        r = self.pool.urlopen(method, path, body=data, headers=headers or {})
        assert r.headers.get("Content-Type", "").startswith("application/json"), r.data[:200]
        return r.status, json.loads(r.data)


def error(status_body: tuple[int, Any], code: int) -> str:
    """The message of an error answer that must have HTTP status `code`."""
    status, body = status_body
    assert status == code, body
    assert isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]
    return str(body["message"])
