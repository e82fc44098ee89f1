"""The local authenticated channel that hands a participant's SFrame keys to its browser page.

With `media: browser` the gateway does no media itself: the page of the same
participant seals and opens the frames (WebCrypto), and gets its keys here, a
WebSocket on loopback:

    GET /keys?token=T     T: a random per-run token (`secrets.token_urlsafe`)

The page learns the URL from its own address's fragment (`#keys=...`), which a
browser never sends to the signalling server. A request is refused before any
upgrade unless

* its Origin is one of the configured page origins (the signalling server's):
  403. Browsers always send Origin on a WebSocket; this stops another site open
  in the same browser from reaching the keys, whatever it guesses. A request
  without an Origin is refused as well: it is not from the page;
* its token matches (constant-time compare): 401.

Messages to the page, one JSON object per key change (`MediaKeys.subscribe`),
starting with the keys held when the page connects:

    {"type": "hello", "page": N, "ctr_base": N * 2^32, "suite": 5}
    {"type": "install", "epoch", "send_kid", "recv_kid", "send_key", "recv_key",
     "source", "key_id", "suite"}                       keys: base64, 32 bytes
    {"type": "activate", "epoch", "send_kid", "source", "key_id"}
    {"type": "retire", "epoch", "send_kid", "recv_kid"}
    {"type": "invalidate", "reason"}

`hello` comes first. A reloaded page gets the same keys again but has lost its
SFrame counters; each connection therefore starts its counters at a base of its
own (`ctr_base`, 2^32 counter values per connection and KID), so no (KID, CTR)
pair is ever used twice under one key. The page sends `{"type": "stats", ...}`
with its counters; the latest of each open connection is kept (`page_stats`).

Key bytes and the token go only over this socket: the access log is off (the
token is in the request line) and nothing here logs a message to the page.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from aiohttp import WSMsgType, web
from yarl import URL

from gateways.webrtc.keys import KeyEvent, MediaKeys

log = logging.getLogger("qgw.gateway.webrtc.handoff")

CTR_RANGE_BITS = 32             # counter values per connection and KID: 2^32 (years of frames)
MAX_MESSAGE_BYTES = 64 * 1024   # a stats report is a few hundred bytes
MAX_STATS_FIELDS = 32
_STAT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_LOOPBACK_NAMES = ("localhost",)

Stats = dict[str, Any]


def normalize_origin(origin: str) -> str | None:
    """`scheme://host[:port]` as a browser sends it in Origin (default port left out)."""
    try:
        url = URL(origin.strip())
    except ValueError:
        return None
    if url.scheme not in ("http", "https") or not url.host:
        return None
    return str(url.origin()).rstrip("/").lower()


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _b64(secret: Any) -> str | None:
    return None if secret is None else base64.b64encode(secret.expose()).decode("ascii")


def event_message(event: KeyEvent, suite: int) -> dict[str, Any]:
    """The JSON object that tells the page about `event` (carries key bytes for install)."""
    if event.kind == "install":
        return {"type": "install", "epoch": event.epoch, "send_kid": event.send_kid,
                "recv_kid": event.recv_kid, "send_key": _b64(event.send_key),
                "recv_key": _b64(event.recv_key), "source": event.source,
                "key_id": event.key_id, "suite": suite}
    if event.kind == "activate":
        return {"type": "activate", "epoch": event.epoch, "send_kid": event.send_kid,
                "source": event.source, "key_id": event.key_id}
    if event.kind == "retire":
        return {"type": "retire", "epoch": event.epoch, "send_kid": event.send_kid,
                "recv_kid": event.recv_kid}
    if event.kind == "invalidate":
        return {"type": "invalidate", "reason": event.reason}
    raise ValueError(f"unknown key event kind {event.kind!r}")


def _clean_stats(report: dict[str, Any]) -> Stats:
    """The page's counters, only short names with scalar values: the page is not trusted
    to keep the gateway's memory small."""
    out: Stats = {}
    for name, value in report.items():
        if name == "type" or not isinstance(name, str) or not _STAT_NAME.match(name):
            continue
        if isinstance(value, str):
            value = value[:128]
        elif not (value is None or isinstance(value, bool | int | float)):
            continue
        out[name] = value
        if len(out) >= MAX_STATS_FIELDS:
            break
    return out


class KeyHandoff:
    """Serves `keys` to the participant's browser page on a loopback WebSocket."""

    def __init__(self, keys: MediaKeys, host: str = "127.0.0.1", port: int = 0,
                 origins: Iterable[str] = ()) -> None:
        if not _is_loopback(host):
            raise ValueError(f"the key handoff must listen on loopback, not {host!r}: "
                             "it hands out keys without TLS")
        self.keys = keys
        self.host = host
        self._port = port
        self._origins: set[str] = set()
        for origin in origins:
            normal = normalize_origin(origin)
            if normal is None:
                raise ValueError(f"not a page origin (scheme://host[:port]): {origin!r}")
            self._origins.add(normal)
        self._token = secrets.token_urlsafe(32)
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._pages = 0
        self._stats_lock = threading.Lock()   # page_stats may be read from another thread
        self._stats: dict[int, Stats] = {}
        self._latest: int | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/keys", self._keys)
        return app

    async def start(self) -> None:
        # No access log: the token is in the request line.
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        log.info("key handoff for the browser page on %s:%d (origins: %s)", self.host,
                 self._port, ", ".join(sorted(self._origins)) or "none")

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"gateway stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- what the gateway shows ------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The page's key URL. It carries the token: hand it to the page, never log it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self._port}/keys?token={self._token}"

    def page_link(self, page: str, room: str, name: str) -> str:
        """The call page's address for this participant, the key URL in its fragment.

        Carries the token like `url`: show it to the user, never log it.
        """
        query = f"room={quote(room, safe='')}&name={quote(name, safe='')}"
        return f"{page.rstrip('/')}/?{query}#keys={quote(self.url, safe='')}"

    @property
    def connected(self) -> int:
        """Pages connected now."""
        return len(self._sockets)

    def page_stats(self) -> dict[int, Stats]:
        """The latest stats report of each connected page, by connection number."""
        with self._stats_lock:
            return {page: dict(stats) for page, stats in self._stats.items()}

    def latest_stats(self) -> Stats | None:
        """The most recent stats report of any connected page."""
        with self._stats_lock:
            if self._latest is None or self._latest not in self._stats:
                return None
            return dict(self._stats[self._latest])

    # -- the socket --------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        origin = normalize_origin(request.headers.get("Origin", ""))
        if origin is None or origin not in self._origins:
            log.warning("key handoff: refused a request from origin %r",
                        request.headers.get("Origin", "")[:100])
            raise web.HTTPForbidden(text="origin not allowed\n")
        given = request.query.get("token", "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, self._token.encode("ascii")):
            log.warning("key handoff: refused a request with a wrong or missing token")
            raise web.HTTPUnauthorized(text="token required\n")

    async def _keys(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_MESSAGE_BYTES)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="a WebSocket upgrade is expected\n")
        await ws.prepare(request)
        self._pages += 1
        page = self._pages
        self._sockets.add(ws)
        log.info("browser page %d connected to the key handoff", page)
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        outbox.put_nowait({"type": "hello", "page": page, "ctr_base": page << CTR_RANGE_BITS,
                           "suite": int(self.keys.suite)})
        loop = asyncio.get_running_loop()
        suite = int(self.keys.suite)

        def forward(event: KeyEvent) -> None:
            # MediaKeys calls this from the key session's thread: hand over to our loop.
            # The message is built now, while the event's keys are surely not wiped yet.
            try:
                message = event_message(event, suite)
            except ValueError:
                log.error("key handoff: could not forward a %s event to page %d", event.kind,
                          page)
                return
            with contextlib.suppress(RuntimeError):  # the loop has closed: page gone with it
                loop.call_soon_threadsafe(outbox.put_nowait, message)

        unsubscribe = self.keys.subscribe(forward)
        sender = asyncio.create_task(self._send(ws, outbox))
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    self._take_report(page, msg.data)
        finally:
            # Bookkeeping first: the handler itself may be cancelled (client gone).
            unsubscribe()
            sender.cancel()
            self._sockets.discard(ws)
            with self._stats_lock:
                self._stats.pop(page, None)
            log.info("browser page %d left the key handoff", page)
            await asyncio.gather(sender, return_exceptions=True)
        return ws

    @staticmethod
    async def _send(ws: web.WebSocketResponse, outbox: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            message = await outbox.get()
            try:
                await ws.send_str(json.dumps(message))
            except ConnectionError:
                return

    def _take_report(self, page: int, data: str) -> None:
        try:
            report = json.loads(data)
        except ValueError:
            log.debug("page %d sent something that is not JSON", page)
            return
        if not isinstance(report, dict) or report.get("type") != "stats":
            log.debug("page %d sent an unexpected message", page)
            return
        stats = _clean_stats(report)
        with self._stats_lock:
            self._stats[page] = stats
            self._latest = page
