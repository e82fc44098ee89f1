"""KME-to-KME calls over mutual TLS, client side: one WebSocket per peer, many calls.

KMEs talk to each other constantly (stream pushes, reservations, releases),
so a link keeps one WebSocket open instead of paying an HTTP request per
call (aiohttp's client request path cost ~0.5 ms of CPU here, a WebSocket
message ~0.05 ms). Calls carry an id; answers may come back in any order.

The peer is identified by its KME ID: TLS verifies the peer certificate
against the KME's DNS name (`kme_dns_name`, e.g. kme-b) whatever host the
link URL uses, so a valid certificate of another KME at the same address
(say both on 127.0.0.1) is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
from typing import Any

import aiohttp

from qgw.pki import kme_dns_name

WS_PATH = "/kme/v1/ws"
MAX_MESSAGE = 8 * 1024 * 1024


class PeerError(Exception):
    """A peer call failed. `status` is None when the peer could not be reached."""

    def __init__(self, peer: str, status: int | None, message: str,
                 details: list[dict[str, Any]] | None = None) -> None:
        self.peer = peer
        self.status = status
        self.message = message
        self.details = details
        super().__init__(f"peer KME {peer}: {message}")


class PeerClient:
    def __init__(self, peer_id: str, url: str, ssl_ctx: ssl.SSLContext, timeout_s: float) -> None:
        self.peer_id = peer_id
        self.url = url
        self._ssl = ssl_ctx
        self._timeout_s = timeout_s
        self._server_name = kme_dns_name(peer_id)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connecting: asyncio.Lock | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[tuple[int, Any]]] = {}
        self._ids = itertools.count(1)

    async def close(self) -> None:
        ws, reader = self._ws, self._reader
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if ws is not None:
            await ws.close()
        if self._session is not None:
            await self._session.close()
        self._ws = self._session = self._reader = None
        self._fail_waiting("link closed")

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._ws is not None and not self._ws.closed:
                return self._ws
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=self._ssl, limit=4))
            try:
                ws = await self._session.ws_connect(
                    self.url + WS_PATH, server_hostname=self._server_name,
                    timeout=aiohttp.ClientWSTimeout(ws_close=self._timeout_s),
                    max_msg_size=MAX_MESSAGE, heartbeat=10.0, autoping=True,
                )
            except aiohttp.ClientConnectorCertificateError:
                raise PeerError(self.peer_id, None, f"{self.url} did not present the "
                                f"certificate of KME {self.peer_id}") from None
            except aiohttp.WSServerHandshakeError as exc:
                raise PeerError(self.peer_id, exc.status, f"refused the link: {exc.message}") \
                    from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = str(exc) or type(exc).__name__
                raise PeerError(self.peer_id, None,
                                f"unreachable at {self.url} ({reason})") from None
            self._ws = ws
            self._reader = asyncio.create_task(self._read(ws), name=f"peer-{self.peer_id}")
            return ws

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                    fut = self._waiting.pop(int(data["id"]), None)
                    if fut is not None and not fut.done():
                        fut.set_result((int(data["status"]), data.get("body")))
                except (ValueError, KeyError, TypeError, RecursionError):
                    continue
        finally:
            if self._ws is ws:
                self._ws = None
            self._fail_waiting("connection lost")

    def _fail_waiting(self, why: str) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(PeerError(self.peer_id, None, f"{why} ({self.url})"))

    async def call(self, path: str, body: dict[str, Any],
                   timeout_s: float | None = None) -> dict[str, Any]:
        timeout_s = timeout_s or self._timeout_s
        ws = self._ws if self._ws is not None and not self._ws.closed else await self._connect()
        call_id = next(self._ids)
        fut: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = fut
        try:
            await ws.send_str(json.dumps({"id": call_id, "op": path, "body": body}))
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            async with asyncio.timeout(timeout_s):
                status, data = await fut
        except TimeoutError:
            raise PeerError(self.peer_id, None, f"no answer within {timeout_s:g} s") \
                from None
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise PeerError(self.peer_id, None, f"connection lost ({exc})") from None
        finally:
            self._waiting.pop(call_id, None)
        if status != 200:
            message = data.get("message") if isinstance(data, dict) else None
            details = data.get("details") if isinstance(data, dict) else None
            raise PeerError(self.peer_id, status, str(message or f"status {status}"),
                            details if isinstance(details, list) else None)
        if not isinstance(data, dict):
            raise PeerError(self.peer_id, status, "answered with a non-object body")
        return data
