"""HTTP side of a KME: aiohttp over mutual TLS, errors as ETSI JSON bodies.

aiohttp hands the verified peer certificate to the handler through the
transport (`get_extra_info("peercert")`), which is why it was picked over
ASGI servers (uvicorn does not pass the client certificate to the app).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

import yaml
from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kme import api004, skip, wire014
from kme.config import KmeConfig
from kme.errors import ApiError
from kme.node import Kme
from kme.peer import MAX_MESSAGE as PEER_MAX_MESSAGE
from kme.peer import WS_PATH
from qgw.tls import Identity, peer_identity, server_context

log = logging.getLogger("qgw.kme")

MAX_BODY = 256 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KME_KEY = web.AppKey("kme", Kme)
PEER_SOCKETS = web.AppKey("peer_sockets", set[web.WebSocketResponse])
SHUTDOWN_TIMEOUT_S = 2.0


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status,
                        content_type="application/json")


def _caller(request: web.Request) -> Identity | None:
    transport = request.transport
    return peer_identity(transport.get_extra_info("peercert") if transport else None)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place errors become responses: always JSON, never HTML or a trace."""
    started = time.perf_counter()
    call = request.match_info.route.name or "unknown"
    kme = request.app[KME_KEY]
    try:
        response = await handler(request)
    except ApiError as exc:
        response = _json(exc.body(), exc.status)
    except web.HTTPException as exc:
        message = {
            404: "no such resource; the KME serves ETSI GS QKD 014 under /api/v1/keys/, "
                 "ETSI GS QKD 004 under /api/v2/004/, SKIP at /capabilities, /key and "
                 "/entropy (see /api/v1/openapi.json)",
            405: f"method {request.method} not allowed here",
            413: f"request body larger than {MAX_BODY} bytes",
        }.get(exc.status, exc.reason)
        response = _json({"message": message}, exc.status)
        for name in ("Allow",):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception:
        log.exception("internal error in %s", call)
        response = _json({"message": "internal KME error"}, 500)
    kme.metrics.request(call, response.status, time.perf_counter() - started)
    return response


async def _body(request: web.Request, *, allow_empty: bool) -> dict[str, Any]:
    return wire014.parse_json_body(await request.read(), allow_empty=allow_empty)


async def status(request: web.Request) -> web.Response:
    kme = request.app[KME_KEY]
    return _json(kme.status(_caller(request), request.match_info["sae"]))


async def enc_keys(request: web.Request) -> web.Response:
    kme = request.app[KME_KEY]
    caller = _caller(request)
    if request.method == "POST":
        req = wire014.key_request_from_json(await _body(request, allow_empty=True), kme.limits)
    else:
        req = wire014.key_request_from_query(request.query, kme.limits)
    keys = await kme.enc_keys(caller, request.match_info["sae"], req)
    return _json(wire014.key_container(keys))


async def dec_keys(request: web.Request) -> web.Response:
    kme = request.app[KME_KEY]
    caller = _caller(request)
    if request.method == "POST":
        ids = wire014.key_ids_from_json(await _body(request, allow_empty=False), kme.limits)
    else:
        ids = wire014.key_ids_from_query(request.query.getall("key_ID", []), kme.limits)
    keys = kme.dec_keys(caller, request.match_info["sae"], ids)
    return _json(wire014.key_container(keys))


async def admin_link(request: web.Request) -> web.Response:
    """`PUT /admin/v1/links/{peer}` with {"up": false|true}: cut or restore a QKD link."""
    kme = request.app[KME_KEY]
    kme.require_operator(_caller(request))
    body = await _body(request, allow_empty=False)
    if not isinstance(body.get("up"), bool):
        raise ApiError.bad_request("body must be {\"up\": true|false}", parameter="up")
    return _json(await kme.set_link(request.match_info["peer"], body["up"]))


async def admin_network(request: web.Request) -> web.Response:
    """`GET /admin/v1/network`: this KME's links and its view of the whole network."""
    kme = request.app[KME_KEY]
    kme.require_operator(_caller(request))
    return _json(kme.describe())


async def openapi(request: web.Request) -> web.Response:
    doc = yaml.safe_load(files("kme").joinpath("openapi.yaml").read_text())
    return _json(doc)


PeerOp = Callable[[Kme, Identity | None, dict[str, Any]], dict[str, Any]]
AsyncPeerOp = Callable[[Kme, Identity | None, dict[str, Any]], Awaitable[dict[str, Any]]]

PEER_OPS: dict[str, PeerOp] = {
    "/kme/v1/stream": Kme.peer_stream,
    "/kme/v1/reserve": Kme.peer_reserve,
    "/kme/v1/release": Kme.peer_release,
    "/kme/v1/adverts": Kme.peer_adverts,
    "/kme/v1/link_state": Kme.peer_link_state,
}
# Calls that wait on other KMEs run as tasks, so the link's other calls are not held up.
ASYNC_PEER_OPS: dict[str, AsyncPeerOp] = {
    "/kme/v1/relay": Kme.peer_relay,
}


async def peer_socket(request: web.Request) -> web.StreamResponse:
    """The KME-to-KME link: a WebSocket of {id, op, body} calls and {id, status, body} answers."""
    kme = request.app[KME_KEY]
    caller = _caller(request)
    kme.peer_link(caller)  # refuses (401) anyone but a linked peer KME, before the upgrade
    ws = web.WebSocketResponse(max_msg_size=PEER_MAX_MESSAGE, heartbeat=10.0)
    await ws.prepare(request)
    sockets = request.app[PEER_SOCKETS]
    sockets.add(ws)
    try:
        await _serve_peer(kme, caller, ws)
    finally:
        sockets.discard(ws)
    return ws


async def _close_peer_sockets(app: web.Application) -> None:
    """On shutdown, close the peer links at once instead of waiting for them to end."""
    sockets = app[PEER_SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"KME shutting down")


async def _serve_peer(kme: Kme, caller: Identity | None, ws: web.WebSocketResponse) -> None:
    tasks: set[asyncio.Task[None]] = set()
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            try:
                call = json.loads(msg.data)
                call_id, op, body = call["id"], call["op"], call["body"]
            except (ValueError, KeyError, TypeError, RecursionError):
                await ws.send_str(json.dumps({"id": None, "status": 400,
                                              "body": {"message": "malformed peer call"}}))
                continue
            if op in ASYNC_PEER_OPS:
                task = asyncio.create_task(_answer_peer(kme, caller, ws, call_id, op, body))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                await _answer_peer(kme, caller, ws, call_id, op, body)
    finally:
        for task in tasks:
            task.cancel()


async def _answer_peer(kme: Kme, caller: Identity | None, ws: web.WebSocketResponse,
                       call_id: Any, op: Any, body: Any) -> None:
    started = time.perf_counter()
    method = PEER_OPS.get(op) if isinstance(op, str) else None
    async_method = ASYNC_PEER_OPS.get(op) if isinstance(op, str) else None
    try:
        if method is None and async_method is None:
            raise ApiError.bad_request(f"unknown peer operation {op!r}")
        if not isinstance(body, dict):
            raise ApiError.bad_request("peer call body must be an object")
        if async_method is not None:
            status, data = 200, await async_method(kme, caller, body)
        else:
            assert method is not None
            status, data = 200, method(kme, caller, body)
    except ApiError as exc:
        status, data = exc.status, exc.body()
    except Exception:
        log.exception("internal error in peer call %s", op)
        status, data = 500, {"message": "internal KME error"}
    if not ws.closed:
        await ws.send_str(json.dumps({"id": call_id, "status": status, "body": data}))
    known = method is not None or async_method is not None
    name = op.rsplit("/", 1)[-1] if known else "unknown"
    kme.metrics.request(f"peer_{name}", status, time.perf_counter() - started)


def make_app(kme: Kme) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
    app[KME_KEY] = kme
    app[PEER_SOCKETS] = set()
    app.on_shutdown.append(_close_peer_sockets)
    r = app.router
    base = "/api/v1/keys/{sae}"
    r.add_get(base + "/status", status, name="status")
    r.add_route("GET", base + "/enc_keys", enc_keys, name="enc_keys")
    r.add_route("POST", base + "/enc_keys", enc_keys, name="enc_keys_post")
    r.add_route("GET", base + "/dec_keys", dec_keys, name="dec_keys")
    r.add_route("POST", base + "/dec_keys", dec_keys, name="dec_keys_post")
    r.add_get("/api/v1/openapi.json", openapi, name="openapi")
    r.add_get(WS_PATH, peer_socket, name="peer_link")
    r.add_put("/admin/v1/links/{peer}", admin_link, name="admin_link")
    r.add_get("/admin/v1/network", admin_network, name="admin_network")
    api004.add_routes(app)
    skip.add_routes(app)
    return app


def _metrics_app(kme: Kme) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        for link in kme.links.values():
            kme.metrics.link_available_bits.labels(peer=link.peer).set(link.available_bytes() * 8)
        kme.metrics.reserved_keys.set(kme.store.reserved_key_count())
        return web.Response(body=generate_latest(kme.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(request: web.Request) -> web.Response:
        return _json(kme.describe())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app


class KmeServer:
    """A running KME: key service, HTTPS listener, optional metrics listener."""

    def __init__(self, cfg: KmeConfig) -> None:
        self.cfg = cfg
        self.kme = Kme(cfg)
        self._runners: list[web.AppRunner] = []
        self.port: int | None = None
        self.metrics_port: int | None = None

    async def start(self) -> None:
        ssl_ctx = server_context(self.cfg.tls.files())
        # Metrics first: once the API port answers, everything is up (launchers poll it).
        if self.cfg.metrics is not None:
            mrunner = web.AppRunner(_metrics_app(self.kme), access_log=None, handle_signals=False)
            await mrunner.setup()
            await web.TCPSite(mrunner, self.cfg.metrics.host, self.cfg.metrics.port).start()
            self._runners.append(mrunner)
            self.metrics_port = _bound_port(mrunner)
        runner = web.AppRunner(make_app(self.kme), access_log=None, handle_signals=False,
                               shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.listen.host, self.cfg.listen.port,
                           ssl_context=ssl_ctx, backlog=1024)
        await site.start()
        self._runners.append(runner)
        self.port = _bound_port(runner)
        await self.kme.start()
        log.info("KME %s serving ETSI GS QKD 014 on https://%s:%s", self.cfg.kme_id,
                 self.cfg.listen.host, self.port)

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.kme.stop()


def _bound_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


async def serve_forever(cfg: KmeConfig, ready: Callable[[KmeServer], None] | None = None) -> None:
    server = KmeServer(cfg)
    await server.start()
    if ready:
        ready(server)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
