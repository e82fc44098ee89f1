"""The key handoff to the browser page: who may connect, what it is told, what is kept."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateways.webrtc.handoff import CTR_RANGE_BITS, KeyHandoff, normalize_origin
from gateways.webrtc.keys import MediaKeys, base_key, kid_for
from keyclient.installer import SessionKey
from keyclient.policy import KeySource
from qgw.secret import Secret

PAGE = "http://videocall.example:8080"
TIMEOUT = 5.0


def session_key(epoch: int, source: KeySource = KeySource.QKD) -> SessionKey:
    key_id = None if source is KeySource.PQC else f"qkd-key-{epoch}"
    return SessionKey(epoch, source, key_id, Secret(os.urandom(32)))


def run(handoff: KeyHandoff, body: Callable[[TestClient[Any, Any]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(handoff.app())) as client:
            await body(client)
    asyncio.run(main())


def token_of(handoff: KeyHandoff) -> str:
    return handoff.url.split("token=", 1)[1]


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(ws.receive_json(), TIMEOUT)
    return message


async def until(check: Callable[[], bool]) -> None:
    for _ in range(int(TIMEOUT / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


@pytest.mark.parametrize("token", [None, "", "not-the-token", "x" * 43])
def test_a_wrong_or_missing_token_gets_401_and_no_upgrade(token: str | None) -> None:
    handoff = KeyHandoff(MediaKeys("slave"), origins=[PAGE])

    async def body(client: TestClient[Any, Any]) -> None:
        path = "/keys" if token is None else f"/keys?token={token}"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(path, headers={"Origin": PAGE})
        assert refused.value.status == 401
        assert handoff.connected == 0
        # The right token from the right page is let in (the refusal was the token's).
        ws = await client.ws_connect(f"/keys?token={token_of(handoff)}",
                                     headers={"Origin": PAGE})
        assert (await receive(ws))["type"] == "hello"
        await ws.close()

    run(handoff, body)


@pytest.mark.parametrize("origin", [None, "http://evil.example", "http://videocall.example",
                                    "https://videocall.example:8080", "null"])
def test_a_page_from_another_origin_gets_403(origin: str | None) -> None:
    handoff = KeyHandoff(MediaKeys("slave"), origins=[PAGE])

    async def body(client: TestClient[Any, Any]) -> None:
        headers = {} if origin is None else {"Origin": origin}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(f"/keys?token={token_of(handoff)}", headers=headers)
        assert refused.value.status == 403

    run(handoff, body)


def test_origins_compare_as_a_browser_sends_them() -> None:
    assert normalize_origin("HTTP://VideoCall.Example:80/") == "http://videocall.example"
    assert normalize_origin("https://a.example:443") == "https://a.example"
    assert normalize_origin("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert normalize_origin("null") is None
    assert normalize_origin("file:///tmp/x.html") is None
    handoff = KeyHandoff(MediaKeys("slave"), origins=["http://VIDEOCALL.example:8080/"])

    async def body(client: TestClient[Any, Any]) -> None:
        ws = await client.ws_connect(f"/keys?token={token_of(handoff)}",
                                     headers={"Origin": PAGE})
        assert (await receive(ws))["type"] == "hello"
        await ws.close()

    run(handoff, body)


def test_it_listens_on_loopback_only_and_checks_its_origins() -> None:
    with pytest.raises(ValueError, match="loopback"):
        KeyHandoff(MediaKeys("slave"), host="0.0.0.0", origins=[PAGE])
    with pytest.raises(ValueError, match="origin"):
        KeyHandoff(MediaKeys("slave"), origins=["videocall.example"])
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        KeyHandoff(MediaKeys("slave"), host=host, origins=[PAGE])
    assert KeyHandoff(MediaKeys("slave"), host="::1").url.startswith("ws://[::1]:")


def test_events_are_forwarded_in_order_from_the_keys_held_before_the_page_came() -> None:
    keys = MediaKeys("slave")
    first, second = session_key(1), session_key(2, KeySource.HYBRID)
    keys.install(1, first)
    keys.activate(1)
    handoff = KeyHandoff(keys, origins=[PAGE])

    def b64(key: SessionKey, kid: int) -> str:
        return base64.b64encode(base_key(key, kid).expose()).decode()

    async def body(client: TestClient[Any, Any]) -> None:
        ws = await client.ws_connect(f"/keys?token={token_of(handoff)}",
                                     headers={"Origin": PAGE})
        assert await receive(ws) == {"type": "hello", "page": 1,
                                     "ctr_base": 1 << CTR_RANGE_BITS, "suite": 5}
        assert await receive(ws) == {
            "type": "install", "epoch": 1, "send_kid": kid_for(1, "slave"),
            "recv_kid": kid_for(1, "master"), "send_key": b64(first, kid_for(1, "slave")),
            "recv_key": b64(first, kid_for(1, "master")), "source": "qkd",
            "key_id": "qkd-key-1", "suite": 5}
        assert await receive(ws) == {"type": "activate", "epoch": 1, "send_kid": 3,
                                     "source": "qkd", "key_id": "qkd-key-1"}

        # The key session drives MediaKeys from a thread of its own.
        def rotate() -> None:
            keys.install(2, second)
            keys.activate(2)
            keys.retire(1)
            keys.invalidate("the KME stopped answering")
        session = threading.Thread(target=rotate)
        session.start()
        session.join()

        install = await receive(ws)
        assert install["type"] == "install" and install["epoch"] == 2
        assert install["source"] == "hybrid"
        assert base64.b64decode(install["recv_key"]) == base_key(second, 4).expose()
        assert await receive(ws) == {"type": "activate", "epoch": 2, "send_kid": 5,
                                     "source": "hybrid", "key_id": "qkd-key-2"}
        assert await receive(ws) == {"type": "retire", "epoch": 1, "send_kid": 3,
                                     "recv_kid": 2}
        assert await receive(ws) == {"type": "invalidate",
                                     "reason": "the KME stopped answering"}
        await ws.close()
        await until(lambda: handoff.connected == 0)
        keys.install(3, session_key(3))   # nobody listens any more: nothing breaks

    run(handoff, body)


def test_each_connection_gets_a_counter_range_of_its_own() -> None:
    keys = MediaKeys("master")
    keys.install(7, session_key(7))
    keys.activate(7)
    handoff = KeyHandoff(keys, origins=[PAGE])

    async def body(client: TestClient[Any, Any]) -> None:
        bases = []
        for _ in range(3):   # a page reloaded twice: the same keys each time
            ws = await client.ws_connect(f"/keys?token={token_of(handoff)}",
                                         headers={"Origin": PAGE})
            hello = await receive(ws)
            assert (await receive(ws))["epoch"] == 7
            bases.append(hello["ctr_base"])
            await ws.close()
        assert bases == [1 << 32, 2 << 32, 3 << 32]

    run(handoff, body)


def test_the_latest_stats_of_each_page_are_kept_while_it_is_connected() -> None:
    handoff = KeyHandoff(MediaKeys("slave"), origins=[PAGE])
    url = f"/keys?token={token_of(handoff)}"

    async def body(client: TestClient[Any, Any]) -> None:
        one = await client.ws_connect(url, headers={"Origin": PAGE})
        two = await client.ws_connect(url, headers={"Origin": PAGE})
        await one.send_json({"type": "stats", "frames_encrypted": 10, "decrypt_failures": 0})
        await one.send_json({"type": "stats", "frames_encrypted": 25, "decrypt_failures": 1,
                             "send_kid": 3, "connection_state": "connected",
                             "nested": {"not": "kept"}, "Bad-Name": 1, "long": "x" * 500})
        await until(lambda: handoff.page_stats().get(1, {}).get("frames_encrypted") == 25)
        assert handoff.page_stats()[1] == {"frames_encrypted": 25, "decrypt_failures": 1,
                                           "send_kid": 3, "connection_state": "connected",
                                           "long": "x" * 128}
        await two.send_str("not json")
        await two.send_json({"type": "something else", "frames_encrypted": 99})
        await two.send_json({"type": "stats", "frames_decrypted": 7})
        await until(lambda: 2 in handoff.page_stats())
        assert handoff.page_stats() == {1: handoff.page_stats()[1],
                                        2: {"frames_decrypted": 7}}
        assert handoff.latest_stats() == {"frames_decrypted": 7}
        await two.close()
        await until(lambda: 2 not in handoff.page_stats())
        assert handoff.latest_stats() is None
        assert list(handoff.page_stats()) == [1]
        await one.close()
        await until(lambda: handoff.page_stats() == {})

    run(handoff, body)


def test_no_key_bytes_nor_the_token_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    keys = MediaKeys("slave")
    session = session_key(1)
    keys.install(1, session)
    keys.activate(1)
    handoff = KeyHandoff(keys, origins=[PAGE])
    secrets = [base_key(session, kid).expose() for kid in (2, 3)] + [session.secret.expose()]

    async def main() -> None:
        await handoff.start()
        try:
            async with aiohttp.ClientSession() as http:
                # refused ones too: their request lines carry a token
                for origin, url in (("http://evil.example", handoff.url),
                                    (PAGE, handoff.url.replace("token=", "token=x"))):
                    with pytest.raises(aiohttp.WSServerHandshakeError):
                        await http.ws_connect(url, headers={"Origin": origin})
                async with http.ws_connect(handoff.url, headers={"Origin": PAGE}) as ws:
                    got = [await receive(ws) for _ in range(3)]
                    keys.install(2, session_key(2))
                    got.append(await receive(ws))
                    await ws.send_json({"type": "stats", "frames_encrypted": 1})
                    await until(lambda: handoff.latest_stats() is not None)
        finally:
            await handoff.stop()
        assert [m["type"] for m in got] == ["hello", "install", "activate", "install"]
        assert base64.b64decode(got[1]["send_key"]) == secrets[1]   # it did carry keys

    asyncio.run(main())
    text = caplog.text
    assert "key handoff" in text and "browser page 1 connected" in text
    assert token_of(handoff) not in text
    for secret in secrets:
        for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
            assert form not in text


def test_stop_disconnects_the_pages() -> None:
    handoff = KeyHandoff(MediaKeys("slave"), origins=[PAGE])

    async def main() -> None:
        await handoff.start()
        assert handoff.port > 0
        assert handoff.url.startswith(f"ws://127.0.0.1:{handoff.port}/keys?token=")
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(handoff.url, headers={"Origin": PAGE})
            assert (await receive(ws))["type"] == "hello"
            await handoff.stop()
            msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        assert handoff.connected == 0

    asyncio.run(main())


def test_the_page_link_carries_the_key_url_in_its_fragment_only() -> None:
    handoff = KeyHandoff(MediaKeys("slave"), port=8765, origins=[PAGE])
    link = handoff.page_link(PAGE + "/", "lab room", "bob")
    page, fragment = link.split("#", 1)
    assert page == f"{PAGE}/?room=lab%20room&name=bob"
    assert token_of(handoff) not in page
    assert fragment.startswith("keys=ws%3A%2F%2F127.0.0.1%3A8765%2Fkeys%3Ftoken%3D")
