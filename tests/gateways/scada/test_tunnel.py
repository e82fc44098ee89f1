"""The SCADA data plane between two real Tunnels, keyed by real KMEs through KeySessions.

No root needed: each "TUN device" is one end of a datagram socketpair (one
read, one packet, like TUN), the tunnel itself is real UDP on loopback, the
keys come from a KME pair over mutual TLS and are agreed by two KeySessions.
The namespace tests (test_scada_netns.py) run the same code on real TUN devices.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_network

import pytest

from gateways.scada.frame import HEADER_LEN, Header
from gateways.scada.keys import Drop, PairKeys, Side
from gateways.scada.tunnel import Route, Tunnel
from keyclient.control import LoopbackChannel
from keyclient.policy import SessionPolicy, SupplyMode
from keyclient.session import KeySession, SessionState
from tests.harness import KmePair

CC_IP, SUB_IP = bytes([10, 99, 0, 1]), bytes([10, 99, 1, 1])


def ipv4_udp(src: bytes, dst: bytes, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, 40001, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst) + udp


@dataclass
class Site:
    app: socket.socket          # what the site's hosts see of the TUN device
    tun: socket.socket          # the gateway's end
    udp: socket.socket
    keys: PairKeys
    tunnel: Tunnel | None = None
    session: KeySession | None = None

    @classmethod
    def make(cls, side: Side) -> Site:
        app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tun.setblocking(False)
        app.settimeout(2)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        return cls(app, tun, udp, PairKeys(1, side))

    def close(self) -> None:
        if self.session is not None:
            self.session.stop()
        if self.tunnel is not None:
            self.tunnel.stop()
        for s in (self.app, self.tun, self.udp):
            s.close()


class Pair:
    """Control centre and one substation, tunnel up, sessions running."""

    def __init__(self, kmes: KmePair, policy: SessionPolicy) -> None:
        self.kmes = kmes
        self.policy = policy
        self.cc = Site.make(Side.CONTROL_CENTRE)
        self.sub = Site.make(Side.SUBSTATION)
        cc_addr, sub_addr = self.cc.udp.getsockname(), self.sub.udp.getsockname()
        self.cc.tunnel = Tunnel(self.cc.tun.fileno(), self.cc.udp, {1: self.cc.keys},
                                [Route(ip_network("10.99.1.0/24"), 1)], {1: sub_addr},
                                learn_endpoints=True)
        self.sub.tunnel = Tunnel(self.sub.tun.fileno(), self.sub.udp, {1: self.sub.keys}, [],
                                 {1: cc_addr})
        self.ch_cc, self.ch_sub = LoopbackChannel.pair()
        self.cc.session = KeySession("master", kme=kmes.client("SAE_1"), local_sae="SAE_1",
                                     peer_sae="SAE_2", channel=self.ch_cc,
                                     installer=self.cc.keys, policy=policy)
        self.sub.session = self._slave(self.ch_sub, self.sub.keys)
        for site in (self.cc, self.sub):
            assert site.tunnel is not None and site.session is not None
            site.tunnel.start()
            site.session.start()

    def _slave(self, channel: LoopbackChannel, keys: PairKeys) -> KeySession:
        return KeySession("slave", kme=self.kmes.client("SAE_2"), local_sae="SAE_2",
                          peer_sae="SAE_1", channel=channel, installer=keys,
                          policy=self.policy)

    def wait_protected(self, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.cc.keys.active_epoch is not None and self.sub.keys.active_epoch is not None:
                return
            time.sleep(0.02)
        raise AssertionError("the pair never got a key")

    def close(self) -> None:
        self.cc.close()
        self.sub.close()


@pytest.fixture
def pair(kmes: KmePair) -> Iterator[Pair]:
    p = Pair(kmes, SessionPolicy(rekey_interval_s=0.3, overlap_s=0.5, pool_target=4))
    try:
        p.wait_protected()
        yield p
    finally:
        p.close()


def test_packets_cross_both_ways_and_the_wire_shows_no_plaintext(pair: Pair) -> None:
    marker = b"MODBUS-PLAINTEXT-MARKER"
    pair.cc.app.send(ipv4_udp(CC_IP, SUB_IP, marker))
    assert pair.sub.app.recv(2048) == ipv4_udp(CC_IP, SUB_IP, marker)
    pair.sub.app.send(ipv4_udp(SUB_IP, CC_IP, marker + b"-back"))
    assert pair.cc.app.recv(2048) == ipv4_udp(SUB_IP, CC_IP, marker + b"-back")
    # What travels on UDP: a sniffer bound next to the substation sees frames only.
    assert pair.cc.tunnel is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spy:
        spy.bind(("127.0.0.1", 0))
        spy.settimeout(2)
        pair.cc.tunnel.endpoints[1] = spy.getsockname()
        pair.cc.app.send(ipv4_udp(CC_IP, SUB_IP, marker))
        frame = spy.recv(4096)
    header = Header.parse(frame)
    assert header.pair == 1 and header.epoch == pair.cc.keys.active_epoch
    assert marker not in frame and len(frame) == HEADER_LEN + 16 + len(ipv4_udp(CC_IP, SUB_IP,
                                                                                   marker))


def test_rekeys_under_traffic_lose_and_repeat_nothing(pair: Pair) -> None:
    """Keys change every 0.3 s while 200 packets a second flow each way."""
    sent = 0
    received: list[int] = []
    start_rekeys = pair.cc.keys.rekeys
    deadline = time.monotonic() + 4
    pair.sub.app.settimeout(0.005)
    while time.monotonic() < deadline:
        pair.cc.app.send(ipv4_udp(CC_IP, SUB_IP, struct.pack("!Q", sent)))
        sent += 1
        try:
            while True:
                pkt = pair.sub.app.recv(2048)
                received.append(struct.unpack("!Q", pkt[-8:])[0])
        except TimeoutError:
            pass
    pair.sub.app.settimeout(1)
    try:
        while len(received) < sent:
            received.append(struct.unpack("!Q", pair.sub.app.recv(2048)[-8:])[0])
    except TimeoutError:
        pass
    rekeys = pair.cc.keys.rekeys - start_rekeys
    assert rekeys >= 8, rekeys
    assert sorted(received) == list(range(sent)), (len(received), sent)  # none lost, none twice
    assert not pair.sub.keys.drops, pair.sub.keys.drops


def test_replayed_truncated_tampered_and_unknown_epoch_are_dropped(pair: Pair) -> None:
    assert pair.cc.tunnel is not None and pair.sub.tunnel is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spy:
        spy.bind(("127.0.0.1", 0))
        spy.settimeout(2)
        real = pair.cc.tunnel.endpoints[1]
        pair.cc.tunnel.endpoints[1] = spy.getsockname()
        frames = []
        for text in (b"once", b"two", b"three"):
            pair.cc.app.send(ipv4_udp(CC_IP, SUB_IP, text))
            frames.append(spy.recv(4096))
        pair.cc.tunnel.endpoints[1] = real
        sub_addr = pair.sub.udp.getsockname()
        frame, fresh1, fresh2 = frames
        spy.sendto(frame, sub_addr)                                 # genuine: delivered
        assert pair.sub.app.recv(2048).endswith(b"once")
        drops = pair.sub.keys.drops
        tun_drops = pair.sub.tunnel.traffic.drops
        cases = [
            (frame, drops, Drop.REPLAYED),                          # the same frame again
            (frame[:20], tun_drops, Drop.TRUNCATED),
            (fresh1[:-1] + bytes([fresh1[-1] ^ 1]), drops, Drop.AUTH_FAILED),   # tampered tag
            (fresh2[:HEADER_LEN] + bytes([fresh2[HEADER_LEN] ^ 0x80]) + fresh2[HEADER_LEN + 1:],
             drops, Drop.AUTH_FAILED),                              # tampered ciphertext
            (bytes(Header(1, 999_999, 5)) + frame[HEADER_LEN:], drops, Drop.UNKNOWN_EPOCH),
            (bytes(Header(7, 1, 5)) + frame[HEADER_LEN:], tun_drops, Drop.UNKNOWN_PAIR),
        ]
        for bad, counter, reason in cases:
            before = counter[reason]
            spy.sendto(bad, sub_addr)
            deadline = time.monotonic() + 2
            while counter[reason] == before and time.monotonic() < deadline:
                time.sleep(0.01)
            assert counter[reason] == before + 1, reason
    pair.sub.app.settimeout(0.3)
    with pytest.raises(TimeoutError):
        pair.sub.app.recv(2048)   # none of them reached the site
    # the genuine frames the forgeries were made of still authenticate afterwards
    pair.sub.tunnel.receive(fresh1, pair.cc.udp.getsockname())
    assert pair.sub.app.recv(2048).endswith(b"two")


def test_a_tampered_header_fails_authentication() -> None:
    """The header is associated data: moving a frame to another sequence number fails."""
    from keyclient.installer import SessionKey
    from keyclient.policy import KeySource
    from qgw.secret import Secret

    key = SessionKey(3, KeySource.QKD, "k", Secret(bytes(range(32))))
    cc, sub = PairKeys(1, Side.CONTROL_CENTRE), PairKeys(1, Side.SUBSTATION)
    for k in (cc, sub):
        k.install(3, key)
        k.activate(3)
    frame = cc.seal(b"packet")
    assert frame is not None
    assert sub.open(Header.parse(frame), frame) == b"packet"
    moved = bytes(Header(1, 3, 9)) + frame[HEADER_LEN:]
    assert sub.open(Header.parse(moved), moved) is None
    assert sub.drops[Drop.AUTH_FAILED] == 1
    # The two directions use different keys: a frame sent back at its sender fails.
    assert cc.open(Header.parse(frame), frame) is None


@pytest.mark.parametrize("mode, survives", [("qkd", False), ("hybrid", False),
                                            ("qkd-or-pqc", True)])
def test_kme_outage_under_each_policy(kmes: KmePair, mode: str, survives: bool) -> None:
    p = Pair(kmes, SessionPolicy(mode=SupplyMode(mode), rekey_interval_s=0.3, grace_s=0.5,
                                 overlap_s=0.2,
                                 pool_target=0, pool_low=0, retry_s=0.1,
                                 ack_timeout_s=1))
    try:
        p.wait_protected()
        kmes.stop("KME_A", "KME_B")
        deadline = time.monotonic() + 10
        assert p.cc.session is not None
        while time.monotonic() < deadline:
            st = p.cc.session.status()
            if (st.state is SessionState.FAILED_CLOSED) != survives and \
                    (not survives or p.cc.keys.source == "pqc"):
                break
            time.sleep(0.05)
        p.cc.app.send(ipv4_udp(CC_IP, SUB_IP, b"after the outage"))
        p.sub.app.settimeout(0.5)
        if survives:
            assert p.cc.keys.source == "pqc"
            assert p.sub.app.recv(2048).endswith(b"after the outage")
        else:
            assert p.cc.session.status().state is SessionState.FAILED_CLOSED
            assert p.cc.keys.active_epoch is None
            with pytest.raises(TimeoutError):
                p.sub.app.recv(2048)          # dropped, never sent in clear
            assert p.cc.keys.drops[Drop.NO_KEY] >= 1
    finally:
        p.close()


def test_a_restarted_substation_rejoins_with_fresh_keys(pair: Pair) -> None:
    old_epoch = pair.sub.keys.active_epoch
    assert pair.sub.session is not None
    pair.sub.session.stop()                     # the substation gateway dies...
    fresh = PairKeys(1, Side.SUBSTATION)        # ...and comes back with nothing
    assert pair.sub.tunnel is not None
    pair.sub.tunnel.pairs[1] = fresh
    pair.sub.keys = fresh
    pair.sub.session = pair._slave(pair.ch_cc.rejoin(), fresh)
    pair.sub.session.start()
    pair.wait_protected()
    assert fresh.active_epoch is not None and fresh.active_epoch != old_epoch
    pair.cc.app.send(ipv4_udp(CC_IP, SUB_IP, b"hello again"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:   # the first packets may still use the old epoch
        try:
            if pair.sub.app.recv(2048).endswith(b"hello again"):
                break
        except TimeoutError:
            pair.cc.app.send(ipv4_udp(CC_IP, SUB_IP, b"hello again"))
    else:
        raise AssertionError("no traffic after the restart")


def test_a_substation_without_a_known_address_is_found_by_its_keepalive(kmes: KmePair) -> None:
    """The control centre has no address for the substation; the keepalive teaches it."""
    p = Pair(kmes, SessionPolicy(rekey_interval_s=30, pool_target=2, pool_low=1))
    try:
        assert p.cc.tunnel is not None and p.sub.tunnel is not None
        p.cc.tunnel.endpoints[1] = None
        p.wait_protected()
        p.cc.app.send(ipv4_udp(CC_IP, SUB_IP, b"lost"))          # nowhere to send it yet
        deadline = time.monotonic() + 2
        while not p.cc.tunnel.traffic.drops[Drop.NO_ROUTE] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.cc.tunnel.traffic.drops[Drop.NO_ROUTE] == 1
        p.sub.tunnel.keepalive_s = 10.0
        p.sub.tunnel.keep_alive(time.monotonic())                 # what its idle loop does
        deadline = time.monotonic() + 2
        while p.cc.tunnel.endpoints[1] is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.cc.tunnel.endpoints[1] == p.sub.udp.getsockname()
        p.cc.app.send(ipv4_udp(CC_IP, SUB_IP, b"found"))
        assert p.sub.app.recv(2048).endswith(b"found")
        # a keepalive carries nothing to the site
        assert p.cc.tunnel.traffic.received_packets == 0
    finally:
        p.close()
