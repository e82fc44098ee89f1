"""The video call's signalling protocol, against the real aiohttp app over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from apps.videocall.server import create_app

Ws = aiohttp.ClientWebSocketResponse
TIMEOUT = 5.0


@asynccontextmanager
async def serving(static: Path | None = None) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(static) if static is not None else create_app()
    async with TestClient(TestServer(app)) as client:
        yield client


async def receive(ws: Ws) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(ws.receive_json(), TIMEOUT)
    return message


async def join(client: TestClient[Any, Any], room: str, name: str) -> tuple[Ws, dict[str, Any]]:
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "join", "room": room, "name": name})
    return ws, await receive(ws)


def run(scenario: Callable[[TestClient[Any, Any]], Awaitable[None]],
        static: Path | None = None) -> None:
    async def main() -> None:
        async with serving(static) as client:
            await scenario(client)
    asyncio.run(main())


def test_second_joiner_is_the_offerer_and_messages_are_relayed() -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        alice, joined = await join(client, "lab", "alice")
        assert joined == {"type": "joined", "room": "lab", "peers": [], "offerer": False}
        bob, joined = await join(client, "lab", "bob")
        assert joined == {"type": "joined", "room": "lab", "peers": ["alice"], "offerer": True}

        offer = {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"}
        await bob.send_json(offer)
        assert await receive(alice) == {**offer, "from": "bob"}
        answer = {"type": "answer", "sdp": "v=0\r\n", "extra": [1, {"kept": True}]}
        await alice.send_json(answer)
        assert await receive(bob) == {**answer, "from": "alice"}
        candidate = {"type": "candidate", "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"}
        await bob.send_json(candidate)
        assert await receive(alice) == {**candidate, "from": "bob"}
        await alice.send_json({"type": "bye"})
        assert await receive(bob) == {"type": "bye", "from": "alice"}
        await alice.close()
        await bob.close()
    run(scenario)


def test_rooms_are_separate() -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        a1, _ = await join(client, "one", "a")
        b1, joined = await join(client, "one", "b")
        assert joined["offerer"] is True
        a2, joined = await join(client, "two", "a")   # same name, other room: fine
        assert joined == {"type": "joined", "room": "two", "peers": [], "offerer": False}
        await b1.send_json({"type": "offer", "sdp": "x"})
        assert (await receive(a1))["sdp"] == "x"
        await a2.send_json({"type": "offer", "sdp": "y"})
        assert await receive(a2) == {"type": "error", "message": "nobody else is in room two"}
        for ws in (a1, b1, a2):
            await ws.close()
    run(scenario)


def test_third_participant_is_turned_away_and_disconnected() -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        alice, _ = await join(client, "lab", "alice")
        bob, _ = await join(client, "lab", "bob")
        carol, answer = await join(client, "lab", "carol")
        assert answer == {"type": "error", "message": "room lab is full"}
        closing = await asyncio.wait_for(carol.receive(), TIMEOUT)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert carol.closed
        # The two in the room saw nothing of it and still talk.
        await alice.send_json({"type": "offer", "sdp": "s"})
        assert await receive(bob) == {"type": "offer", "sdp": "s", "from": "alice"}
        await alice.close()
        await bob.close()
    run(scenario)


def test_leaving_tells_the_other_and_frees_the_place() -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        alice, _ = await join(client, "lab", "alice")
        bob, _ = await join(client, "lab", "bob")
        await bob.close()
        assert await receive(alice) == {"type": "left", "name": "bob"}
        carol, joined = await join(client, "lab", "carol")
        assert joined == {"type": "joined", "room": "lab", "peers": ["alice"], "offerer": True}
        await alice.close()
        assert await receive(carol) == {"type": "left", "name": "alice"}
        dave, joined = await join(client, "lab", "dave")
        assert joined["peers"] == ["carol"]
        await carol.close()
        await dave.close()
    run(scenario)


def test_bad_messages_get_an_error_and_the_socket_stays_open() -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        ws = await client.ws_connect("/ws")
        bad: list[str | bytes] = [
            "{not json", "[1, 2]", '{"room": "lab"}', '{"type": 7}',
            '{"type": "dance"}', '{"type": "offer", "sdp": "x"}',
            '{"type": "join", "room": "lab"}', '{"type": "join", "room": "a b", "name": "x"}',
            b"\x00binary",
        ]
        messages = []
        for text in bad:
            if isinstance(text, bytes):
                await ws.send_bytes(text)
            else:
                await ws.send_str(text)
            answer = await receive(ws)
            assert answer["type"] == "error", text
            messages.append(answer["message"])
        assert messages[0] == "malformed JSON"
        assert "dance" in messages[4]
        assert messages[5] == "join a room first"
        # Still open and usable: join works after all that, and only once.
        await ws.send_json({"type": "join", "room": "lab", "name": "alice"})
        assert (await receive(ws))["type"] == "joined"
        await ws.send_json({"type": "join", "room": "other", "name": "alice"})
        assert await receive(ws) == {"type": "error", "message": "already in room lab"}
        twin, answer = await join(client, "lab", "alice")
        assert answer == {"type": "error", "message": "name alice is taken in room lab"}
        assert not ws.closed and not twin.closed
        await ws.close()
        await twin.close()
    run(scenario)


def test_http_routes(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>call</title>")
    (tmp_path / "call.js").write_text("export const x = 1;\n")
    (tmp_path / ".secret").write_text("hidden")

    async def scenario(client: TestClient[Any, Any]) -> None:
        health = await client.get("/healthz")
        assert health.status == 200 and await health.text() == "ok"
        page = await client.get("/")
        assert page.status == 200 and "<title>call</title>" in await page.text()
        script = await client.get("/static/call.js")
        assert script.status == 200 and "javascript" in script.content_type
        assert await script.text() == "export const x = 1;\n"
        for path in ("/static/.secret", "/static/missing.js", "/static/..%2Fserver.py",
                     "/static/../apps/videocall/server.py"):
            assert (await client.get(path)).status == 404, path
    run(scenario, tmp_path)


def test_help_describes_the_options() -> None:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "apps.videocall.server", "--help"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    for option in ("--host", "--port", "--cert", "--key", "--static"):
        assert option in out
