"""The data plane's fast path keeps the tunnel's behaviour: UDP GSO on send, GRO on receive.

A burst read from the TUN device leaves in one GSO send, yet the wire still
carries one authenticated frame per packet, in order; a coalesced (GRO) burst
is opened frame by frame, so a forged frame in it is dropped alone; when the
kernel refuses GSO the tunnel falls back to one datagram per frame. The
tunnels here are not started: the test calls the reads the data thread makes
after poll() says a side is ready, so the batches are deterministic.
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any

import pytest

from gateways.scada.frame import HEADER_LEN, OVERHEAD, Header
from gateways.scada.keys import Drop, PairKeys, Side
from gateways.scada.tunnel import SOL_UDP, UDP_SEGMENT, Route, Tunnel
from keyclient.installer import SessionKey
from keyclient.policy import KeySource
from qgw.secret import Secret
from tests.gateways.scada.test_tunnel import CC_IP, SUB_IP, ipv4_udp


class CountingSocket(socket.socket):
    """A UDP socket that counts sends and can refuse GSO like a device without offload."""

    refuse_gso = False

    def __init__(self) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_DGRAM)
        self.sends = 0

    def sendto(self, *args: Any) -> int:  # type: ignore[override]
        self.sends += 1
        return super().sendto(*args)

    def sendmsg(self, *args: Any) -> int:  # type: ignore[override]
        self.sends += 1
        if self.refuse_gso:
            raise OSError(5, "Input/output error")
        return super().sendmsg(*args)


@dataclass
class End:
    app: socket.socket
    tun: socket.socket
    udp: CountingSocket
    keys: PairKeys
    tunnel: Tunnel | None = None


def _end(side: Side) -> End:
    app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (app, tun):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    tun.setblocking(False)
    app.settimeout(2)
    udp = CountingSocket()
    udp.bind(("127.0.0.1", 0))
    keys = PairKeys(1, side)
    key = SessionKey(3, KeySource.QKD, "k", Secret(bytes(range(32))))
    keys.install(3, key)
    keys.activate(3)
    return End(app, tun, udp, keys)


@pytest.fixture
def ends() -> Iterator[tuple[End, End]]:
    cc, sub = _end(Side.CONTROL_CENTRE), _end(Side.SUBSTATION)
    cc.tunnel = Tunnel(cc.tun.fileno(), cc.udp, {1: cc.keys},
                       [Route(ip_network("10.99.1.0/24"), 1)], {1: sub.udp.getsockname()})
    sub.tunnel = Tunnel(sub.tun.fileno(), sub.udp, {1: sub.keys}, [],
                        {1: cc.udp.getsockname()})
    try:
        yield cc, sub
    finally:
        for e in (cc, sub):
            for s in (e.app, e.tun, e.udp):
                s.close()


def _ready(sock: socket.socket, timeout: float = 2.0) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def _burst(cc: End, packets: list[bytes]) -> None:
    """The site sends `packets`; the data thread reads them in one burst."""
    assert cc.tunnel is not None
    for p in packets:
        cc.app.send(p)
    cc.tunnel._drain_tun()


def _deliver(sub: End, count: int) -> list[bytes]:
    """What the data thread delivers to the substation's site from `count` packets."""
    assert sub.tunnel is not None
    got: list[bytes] = []
    while sub.tunnel.traffic.received_packets + sum(sub.keys.drops.values()) < count:
        assert _ready(sub.udp), (sub.tunnel.traffic.received_packets, sub.keys.drops)
        sub.tunnel._drain_udp()
    sub.app.setblocking(False)
    while True:
        try:
            got.append(sub.app.recv(65536))
        except BlockingIOError:
            return got


def _packets(sizes: list[int]) -> list[bytes]:
    return [ipv4_udp(CC_IP, SUB_IP, struct.pack("!I", i) + bytes(size - 32))
            for i, size in enumerate(sizes)]


def test_a_burst_leaves_in_one_send_as_one_frame_per_packet(ends: tuple[End, End]) -> None:
    """The first packet at once (no waiting for more), the rest of the burst together."""
    cc, _sub = ends
    assert cc.tunnel is not None and cc.tunnel.gso, "loopback offers UDP GSO"
    packets = _packets([1400] * 20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spy:   # no GRO: one per datagram
        spy.bind(("127.0.0.1", 0))
        spy.settimeout(2)
        cc.tunnel.endpoints[1] = spy.getsockname()
        _burst(cc, packets)
        frames = [spy.recv(65536) for _ in packets]
    assert cc.udp.sends == 2
    assert [len(f) for f in frames] == [len(p) + OVERHEAD for p in packets]
    seqs = [Header.parse(f).seq for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(packets)))
    assert cc.tunnel.traffic.sent_packets == len(packets)
    assert cc.tunnel.traffic.sent_bytes == sum(map(len, packets))


def test_bursts_of_mixed_sizes_arrive_whole_and_in_order(ends: tuple[End, End]) -> None:
    """A shorter frame ends a GSO batch; a longer one starts the next."""
    cc, sub = ends
    packets = _packets([1400, 1400, 600, 1400, 80, 80, 80, 1400, 1400, 1000, 1200])
    _burst(cc, packets)
    assert 1 < cc.udp.sends < len(packets)
    assert _deliver(sub, len(packets)) == packets
    assert not sub.keys.drops


def test_a_forged_frame_in_a_coalesced_burst_is_dropped_alone(ends: tuple[End, End]) -> None:
    cc, sub = ends
    assert sub.tunnel is not None and sub.tunnel.gro, "loopback offers UDP GRO"
    packets = _packets([700] * 3)
    frames = [cc.keys.seal(p) for p in packets]
    assert all(f is not None for f in frames)
    first, middle, last = (bytes(f or b"") for f in frames)
    forged = middle[:HEADER_LEN] + bytes([middle[HEADER_LEN] ^ 1]) + middle[HEADER_LEN + 1:]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.sendmsg([first + forged + last], [(SOL_UDP, UDP_SEGMENT,
                                                struct.pack("=H", len(first)))],
                   0, sub.udp.getsockname())
    assert _deliver(sub, 3) == [packets[0], packets[2]]
    assert sub.keys.drops[Drop.AUTH_FAILED] == 1
    # the genuine middle frame still authenticates: the forgery did not move the window
    assert sub.tunnel is not None
    sub.tunnel.receive(middle, cc.udp.getsockname())
    assert sub.app.recv(65536) == packets[1]


def test_a_replayed_burst_is_dropped_frame_by_frame(ends: tuple[End, End]) -> None:
    cc, sub = ends
    packets = _packets([900] * 4)
    frames = b"".join(cc.keys.seal(p) or b"" for p in packets)
    size = len(packets[0]) + OVERHEAD
    for _ in range(2):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.sendmsg([frames], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0,
                       sub.udp.getsockname())
    assert _deliver(sub, 8) == packets
    assert sub.keys.drops[Drop.REPLAYED] == 4


def test_without_gso_every_frame_still_leaves(ends: tuple[End, End]) -> None:
    """A kernel or device that refuses GSO: the batch goes datagram by datagram, and
    later bursts do not try GSO again."""
    cc, sub = ends
    assert cc.tunnel is not None
    cc.udp.refuse_gso = True
    packets = _packets([1400] * 6)
    _burst(cc, packets)
    assert not cc.tunnel.gso
    assert _deliver(sub, len(packets)) == packets
    assert cc.tunnel.traffic.sent_packets == len(packets)
    before = cc.udp.sends
    _burst(cc, packets)
    assert cc.udp.sends - before == len(packets)


def test_no_key_sends_nothing_from_a_burst(ends: tuple[End, End]) -> None:
    cc, _sub = ends
    assert cc.tunnel is not None
    cc.keys.invalidate("test")
    _burst(cc, _packets([500] * 5))
    assert cc.udp.sends == 0
    assert cc.keys.drops[Drop.NO_KEY] == 5
