"""The network operator's side of the KME admin API (`qgw kme link`, `qgw kme status`).

Calls go over the KMEs' mutual TLS with the operator certificate that
`qgw pki init` issues (pki/admin/operator.pem, OU=ADMIN); SAE and KME
certificates are refused by the admin endpoints.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import urllib3

from qgw.errors import QgwError
from qgw.pki import kme_dns_name
from qgw.tls import TlsFiles, client_context


class OperatorError(QgwError):
    pass


class OperatorClient:
    def __init__(self, url: str, kme_id: str, tls: TlsFiles, timeout_s: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise OperatorError(f"KME URL must be https://host:port, not {url!r}")
        self.url = url
        self._pool = urllib3.HTTPSConnectionPool(
            parts.hostname, parts.port or 443, ssl_context=client_context(tls),
            server_hostname=kme_dns_name(kme_id), assert_hostname=kme_dns_name(kme_id),
            timeout=timeout_s, retries=False)

    def close(self) -> None:
        self._pool.close()

    def set_link(self, peer: str, up: bool) -> dict[str, Any]:
        return self._call("PUT", f"/admin/v1/links/{peer}", {"up": up})

    def network(self) -> dict[str, Any]:
        return self._call("GET", "/admin/v1/network")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self._pool.urlopen(method, path, body=None if body is None else
                                   json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
        except urllib3.exceptions.HTTPError as exc:
            raise OperatorError(f"KME at {self.url} unreachable: {exc}") from None
        try:
            data = json.loads(r.data)
        except ValueError:
            raise OperatorError(f"KME at {self.url} answered {r.status} without JSON") from None
        if r.status != 200:
            message = data.get("message") if isinstance(data, dict) else None
            raise OperatorError(f"KME at {self.url} refused ({r.status}): {message}")
        if not isinstance(data, dict):
            raise OperatorError(f"KME at {self.url} answered with a non-object")
        return data
