"""KME-to-KME calls over mutual TLS (`/kme/v1/...`), client side.

The peer is identified by its KME ID: TLS verifies the peer certificate
against the KME's DNS name (`kme_dns_name`, e.g. kme-b) whatever host the
link URL uses, so a valid certificate of another KME at the same address
(say both on 127.0.0.1) is refused.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp

from qgw.pki import kme_dns_name


class PeerError(Exception):
    """A peer call failed. `status` is None when the peer could not be reached."""

    def __init__(self, peer: str, status: int | None, message: str) -> None:
        self.peer = peer
        self.status = status
        self.message = message
        super().__init__(f"peer KME {peer}: {message}")


class PeerClient:
    def __init__(self, peer_id: str, url: str, ssl_ctx: ssl.SSLContext, timeout_s: float) -> None:
        self.peer_id = peer_id
        self.url = url
        self._ssl = ssl_ctx
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._server_name = kme_dns_name(peer_id)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32, keepalive_timeout=60),
                timeout=self._timeout,
                json_serialize=json.dumps,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        session = self._get_session()
        try:
            async with session.post(self.url + path, json=body,
                                    server_hostname=self._server_name) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorCertificateError:
            raise PeerError(self.peer_id, None,
                            f"{self.url} did not present the certificate of KME "
                            f"{self.peer_id}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = type(exc).__name__ if not str(exc) else str(exc)
            raise PeerError(self.peer_id, None, f"unreachable at {self.url} ({reason})") from None
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {}
        if status != 200:
            message = data.get("message") if isinstance(data, dict) else None
            raise PeerError(self.peer_id, status, str(message or f"HTTP {status}"))
        if not isinstance(data, dict):
            raise PeerError(self.peer_id, status, "answered with a non-object body")
        return data
