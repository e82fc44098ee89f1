"""Signalling server of the video call: rooms of two, SDP relayed over a WebSocket.

    python -m apps.videocall.server --host 0.0.0.0 --port 8080
    python -m apps.videocall.server --port 8443 --cert pki/web.crt --key pki/web.key

HTTP:
    GET /               the browser page (static/index.html)
    GET /static/{file}  the page's other files
    GET /healthz        200 "ok"
    GET /ws             the signalling WebSocket

WebSocket messages are JSON objects with a string "type":

    -> {"type": "join", "room": ROOM, "name": NAME}
    <- {"type": "joined", "room": ROOM, "peers": [names already there], "offerer": bool}
       `offerer` is true for the second participant of a room: the later joiner
       makes the offer. A room holds two; a third participant gets
    <- {"type": "error", "message": "room ROOM is full"}    and the socket is closed.
    -> {"type": "offer" | "answer" | "candidate" | "bye", ...}
       relayed unchanged to the other participant, with "from": NAME added.
    <- {"type": "left", "name": NAME}    when the other participant's socket closes.

Anything else (not JSON, no type, an unknown type, relaying before joining or
with nobody to relay to) gets {"type": "error", "message": ...} and the socket
stays open. Candidates are not trickled by this project's clients (they send
SDP after ICE gathering completes) but are relayed all the same.

The server sees SDP only: media goes peer to peer, end-to-end encrypted with
SFrame, and no key ever passes through here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import ssl
import weakref
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

log = logging.getLogger("qgw.apps.videocall")

STATIC_DIR = Path(__file__).parent / "static"
ROOM_CAPACITY = 2
RELAYED = frozenset({"offer", "answer", "candidate", "bye"})
NAME_RE = re.compile(r"^[\w.-]{1,64}$")          # rooms and participant names
STATIC_FILE_RE = re.compile(r"^[\w-][\w.-]{0,127}$")   # no paths, no dot files
MAX_MESSAGE_BYTES = 256 * 1024                    # an SDP is a few kB
HEARTBEAT_S = 20.0

Room = dict[str, web.WebSocketResponse]           # name -> socket, in join order

ROOMS = web.AppKey("rooms", dict[str, Room])
SOCKETS = web.AppKey("sockets", weakref.WeakSet[web.WebSocketResponse[bool]])
STATIC = web.AppKey("static", Path)


def create_app(static_dir: Path = STATIC_DIR) -> web.Application:
    app = web.Application()
    app[ROOMS] = {}
    app[SOCKETS] = weakref.WeakSet()
    app[STATIC] = static_dir
    app.router.add_get("/", index)
    app.router.add_get("/static/{file}", static_file)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ws", websocket)
    app.on_shutdown.append(_close_sockets)
    return app


async def index(request: web.Request) -> web.StreamResponse:
    return _file(request.app[STATIC] / "index.html")


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["file"]
    if not STATIC_FILE_RE.fullmatch(name):
        raise web.HTTPNotFound
    return _file(request.app[STATIC] / name)


def _file(path: Path) -> web.StreamResponse:
    if not path.is_file():
        raise web.HTTPNotFound
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    rooms = request.app[ROOMS]
    joined: tuple[str, str] | None = None       # (room, name) once joined
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                if msg.type is WSMsgType.BINARY:
                    await _error(ws, "messages are JSON text")
                continue
            message = _parse(msg.data)
            if isinstance(message, str):
                await _error(ws, message)
                continue
            kind = message["type"]
            if kind == "join":
                if joined is not None:
                    await _error(ws, f"already in room {joined[0]}")
                    continue
                joined = await _join(ws, rooms, message)
                if ws.closed:
                    break
            elif kind in RELAYED:
                await _relay(ws, rooms, joined, message)
            else:
                await _error(ws, f"unknown message type {kind[:32]!r}")
    finally:
        if joined is not None:
            await _leave(rooms, *joined)
    return ws


def _parse(text: str) -> dict[str, Any] | str:
    """The message, or why it is not one."""
    try:
        message = json.loads(text)
    except ValueError:
        return "malformed JSON"
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return 'a message is a JSON object with a string "type"'
    return message


async def _join(ws: web.WebSocketResponse, rooms: dict[str, Room],
                message: dict[str, Any]) -> tuple[str, str] | None:
    room, name = message.get("room"), message.get("name")
    if not isinstance(room, str) or not NAME_RE.fullmatch(room):
        await _error(ws, "join needs a room: 1-64 letters, digits, '.', '_' or '-'")
        return None
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        await _error(ws, "join needs a name: 1-64 letters, digits, '.', '_' or '-'")
        return None
    members = rooms.setdefault(room, {})
    if len(members) >= ROOM_CAPACITY:
        log.info("%s turned away: room %s is full", name, room)
        await _error(ws, f"room {room} is full")
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"room is full")
        return None
    if name in members:
        await _error(ws, f"name {name} is taken in room {room}")
        return None
    peers = list(members)
    members[name] = ws          # no await since the capacity check: two joins cannot race
    log.info("%s joined room %s (%d/%d)", name, room, len(members), ROOM_CAPACITY)
    await ws.send_json({"type": "joined", "room": room, "peers": peers,
                        "offerer": bool(peers)})
    return room, name


async def _relay(ws: web.WebSocketResponse, rooms: dict[str, Room],
                 joined: tuple[str, str] | None, message: dict[str, Any]) -> None:
    if joined is None:
        await _error(ws, "join a room first")
        return
    room, name = joined
    others = [sock for peer, sock in rooms.get(room, {}).items() if peer != name]
    if not others:
        await _error(ws, f"nobody else is in room {room}")
        return
    for other in others:
        await _send(other, {**message, "from": name})


async def _leave(rooms: dict[str, Room], room: str, name: str) -> None:
    members = rooms.get(room)
    if members is None or members.pop(name, None) is None:
        return
    log.info("%s left room %s", name, room)
    if not members:
        del rooms[room]
    for other in list(members.values()):
        await _send(other, {"type": "left", "name": name})


async def _send(ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
    if ws.closed:
        return
    with contextlib.suppress(ConnectionError):   # closing: its own handler cleans up
        await ws.send_json(message)


async def _error(ws: web.WebSocketResponse, text: str) -> None:
    await _send(ws, {"type": "error", "message": text})


async def _close_sockets(app: web.Application) -> None:
    sockets = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m apps.videocall.server",
        description="Signalling server of the QKD-keyed video call: serves the browser "
                    "page and relays SDP between the two participants of a room over "
                    "a WebSocket (/ws). Media and keys never pass through it.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8080,
                        help="TCP port (default: %(default)s)")
    parser.add_argument("--static", type=Path, default=STATIC_DIR, metavar="DIR",
                        help="folder of the browser page (default: the packaged one)")
    parser.add_argument("--cert", type=Path, metavar="PEM",
                        help="serve HTTPS/WSS with this certificate chain (browsers give "
                             "camera access only to https pages and to localhost)")
    parser.add_argument("--key", type=Path, metavar="PEM",
                        help="the private key of --cert")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    context = None
    if args.cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    log.info("signalling on %s://%s:%d (page from %s)", "https" if context else "http",
             args.host, args.port, args.static)
    web.run_app(create_app(args.static), host=args.host, port=args.port,
                ssl_context=context, print=None)


if __name__ == "__main__":
    main()
