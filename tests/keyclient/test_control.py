"""The default control channel: framed JSON over mutual TLS between two gateways."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import pytest

from keyclient.control import MAX_FRAME, ChannelDown, TlsControlChannel
from qgw.pki import Pki


class Ends:
    def __init__(self) -> None:
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.links: queue.Queue[bool] = queue.Queue()

    def bind(self, ch: TlsControlChannel) -> TlsControlChannel:
        ch.bind(self.messages.put, self.links.put)
        return ch


def wait(q: queue.Queue[Any], timeout: float = 5.0) -> Any:
    return q.get(timeout=timeout)


@pytest.fixture
def channels(pki: Pki) -> Iterator[tuple[TlsControlChannel, TlsControlChannel, Ends, Ends]]:
    server_end, client_end = Ends(), Ends()
    server = server_end.bind(TlsControlChannel(pki.sae_files("SAE_2"), "SAE_1",
                                               listen=("127.0.0.1", 0)))
    server.start()
    assert server.port
    client = client_end.bind(TlsControlChannel(pki.sae_files("SAE_1"), "SAE_2",
                                               connect=("127.0.0.1", server.port)))
    client.start()
    yield server, client, server_end, client_end
    client.close()
    server.close()


def test_messages_both_ways(channels: Any) -> None:
    server, client, s_end, c_end = channels
    assert wait(s_end.links) is True and wait(c_end.links) is True
    client.send({"type": "hello", "n": 1})
    assert wait(s_end.messages) == {"type": "hello", "n": 1}
    server.send({"type": "ok", "list": [1, 2, 3]})
    assert wait(c_end.messages) == {"type": "ok", "list": [1, 2, 3]}


def test_oversized_message_is_refused_not_sent(channels: Any) -> None:
    _, client, s_end, c_end = channels
    wait(c_end.links)
    with pytest.raises(ChannelDown):
        client.send({"blob": "x" * (MAX_FRAME + 1)})
    client.send({"still": "works"})
    assert wait(s_end.messages) == {"still": "works"}


def test_reconnects_after_the_listener_restarts(channels: Any, pki: Pki) -> None:
    server, client, _, c_end = channels
    assert wait(c_end.links) is True
    port = server.port
    server.close()
    assert wait(c_end.links) is False
    with pytest.raises(ChannelDown):
        client.send({"lost": True})
    again_end = Ends()
    again = again_end.bind(TlsControlChannel(pki.sae_files("SAE_2"), "SAE_1",
                                             listen=("127.0.0.1", port)))
    again.start()
    try:
        assert wait(c_end.links, 10) is True
        client.send({"back": True})
        assert wait(again_end.messages) == {"back": True}
    finally:
        again.close()


def test_peer_with_the_wrong_identity_is_refused(pki: Pki) -> None:
    server_end, client_end = Ends(), Ends()
    # The listener expects SAE_1, but SAE_3 (valid certificate, same CA) connects.
    server = server_end.bind(TlsControlChannel(pki.sae_files("SAE_2"), "SAE_1",
                                               listen=("127.0.0.1", 0)))
    server.start()
    client = client_end.bind(TlsControlChannel(pki.sae_files("SAE_3"), "SAE_2",
                                               connect=("127.0.0.1", server.port or 0)))
    client.start()
    try:
        with pytest.raises(queue.Empty):
            wait(server_end.links, 1.5)
        assert not server.up
    finally:
        client.close()
        server.close()


def test_certificate_of_another_ca_is_refused(pki: Pki, foreign_pki: Pki) -> None:
    server_end, client_end = Ends(), Ends()
    server = server_end.bind(TlsControlChannel(pki.sae_files("SAE_2"), "SAE_1",
                                               listen=("127.0.0.1", 0)))
    server.start()
    client = client_end.bind(TlsControlChannel(foreign_pki.sae_files("SAE_1"), "SAE_2",
                                               connect=("127.0.0.1", server.port or 0)))
    client.start()
    try:
        time.sleep(1.0)
        assert not server.up and not client.up
        with pytest.raises(queue.Empty):
            wait(server_end.links, 0.1)
    finally:
        client.close()
        server.close()


def test_exactly_one_of_listen_or_connect(pki: Pki) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TlsControlChannel(pki.sae_files("SAE_2"), "SAE_1")
