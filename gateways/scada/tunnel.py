"""The data plane: IP packets between the TUN device and UDP, sealed per gateway pair.

One thread for both directions, with non-blocking I/O that waits in poll()
only when idle, so a busy tunnel costs one read, one AEAD call and one write
per packet. Key changes come from the KeySession threads through `PairKeys`.

- outbound (TUN -> UDP): the destination address picks the pair (the control
  centre routes each substation's prefixes to its pair; a substation has one
  pair), the Modbus policy may refuse, `PairKeys.seal` encrypts or drops.
- inbound (UDP -> TUN): the header names pair and epoch; `PairKeys.open`
  authenticates and checks replay; the Modbus policy may refuse; the packet is
  written to the TUN device. The control centre learns a substation's current
  address from its last authentic packet; substations send a sealed keepalive
  whenever they get a new key and when idle for KEEPALIVE_S, so a substation
  without a configured address, or behind NAT, or restarted, is found again.

A refused Modbus request is dropped and both TCP ends are reset (the client's
reset travels back through the tunnel, sealed like any packet).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from gateways.scada.frame import TYPE_KEEPALIVE, FrameError, Header
from gateways.scada.keys import Drop, PairKeys
from gateways.scada.modbus import Direction, ModbusFilter

log = logging.getLogger("qgw.gateway.scada")

MAX_PACKET = 65535
IDLE_POLL_MS = 200
BATCH = 64  # packets taken from one side before looking at the other
KEEPALIVE_S = 10.0

Address = tuple[str, int]


@dataclass
class Route:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    pair: int


class Traffic:
    """Packet and byte counts of the data plane (never contents)."""

    def __init__(self) -> None:
        self.sent_packets = 0
        self.sent_bytes = 0
        self.received_packets = 0
        self.received_bytes = 0
        self.drops: Counter[str] = Counter()


class Tunnel:
    def __init__(self, tun_fd: int, sock: socket.socket, pairs: dict[int, PairKeys],
                 routes: Sequence[Route], endpoints: dict[int, Address | None],
                 policy: ModbusFilter | None = None, *, learn_endpoints: bool = False,
                 keepalive_s: float | None = None) -> None:
        self.fd = tun_fd
        self.sock = sock
        self.pairs = pairs
        self.endpoints = endpoints
        self.policy = policy
        self.learn = learn_endpoints
        self.traffic = Traffic()
        self._routes4 = [(int(r.network.network_address), int(r.network.netmask), r.pair)
                         for r in routes if r.network.version == 4]
        self._routes6 = [(int(r.network.network_address), int(r.network.netmask), r.pair)
                         for r in routes if r.network.version == 6]
        self._single = next(iter(pairs)) if len(pairs) == 1 and not routes else None
        self.keepalive_s = keepalive_s
        self._kept_alive: dict[int, tuple[int | None, float]] = {}  # pair -> (epoch, when)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        sock.setblocking(False)

    def start(self) -> None:
        t = threading.Thread(target=self._run, name="scada-data", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)

    # -- routing -------------------------------------------------------------------

    def pair_for(self, packet: bytes) -> int | None:
        if self._single is not None:
            return self._single
        version = packet[0] >> 4
        if version == 4 and len(packet) >= 20:
            dst = int.from_bytes(packet[16:20], "big")
            routes = self._routes4
        elif version == 6 and len(packet) >= 40:
            dst = int.from_bytes(packet[24:40], "big")
            routes = self._routes6
        else:
            return None
        best: tuple[int, int] | None = None
        for net, mask, pair in routes:
            if dst & mask == net and (best is None or mask > best[0]):
                best = (mask, pair)
        return None if best is None else best[1]

    # -- the two directions ----------------------------------------------------------

    def _run(self) -> None:
        """Both directions in one thread: drain whichever side is ready, in batches.

        One thread, not one per direction: two busy Python threads in one process
        hand the GIL back and forth on every packet, which cost more than the
        crypto (measured: 2-3x fewer packets per second).
        """
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN)
        while not self._stop.is_set():
            moved = self._drain_tun() + self._drain_udp()
            if moved:
                continue
            if self.keepalive_s is not None:
                self.keep_alive(time.monotonic())
            poller.poll(IDLE_POLL_MS)

    def _drain_tun(self) -> int:
        for n in range(BATCH):
            try:
                packet = os.read(self.fd, MAX_PACKET)
            except BlockingIOError:
                return n
            except OSError as exc:
                if not self._stop.is_set():
                    log.error("reading the TUN device failed: %s", exc.strerror)
                return n
            self.send(packet)
        return BATCH

    def _drain_udp(self) -> int:
        for n in range(BATCH):
            try:
                frame, addr = self.sock.recvfrom(MAX_PACKET)
            except BlockingIOError:
                return n
            except OSError as exc:
                log.debug("receiving failed: %s", exc.strerror)  # e.g. ICMP unreachable
                return n
            self.receive(frame, addr)
        return BATCH

    def send(self, packet: bytes, pair: int | None = None) -> None:
        """Seal one packet from the local site and send it to its pair's peer."""
        if pair is None:
            pair = self.pair_for(packet)
        keys = self.pairs.get(pair) if pair is not None else None
        if keys is None or pair is None:
            self.traffic.drops[Drop.NO_ROUTE] += 1
            return
        if self.policy is not None and not self._allowed(packet, Direction.OUTBOUND, pair):
            return
        frame = keys.seal(packet)
        endpoint = self.endpoints.get(pair)
        if frame is None:
            return
        if endpoint is None:
            self.traffic.drops[Drop.NO_ROUTE] += 1
            return
        try:
            self.sock.sendto(frame, endpoint)
        except BlockingIOError:
            self.traffic.drops["send_buffer_full"] += 1
            return
        except OSError as exc:
            self.traffic.drops["send_failed"] += 1
            log.debug("sending to pair %d failed: %s", pair, exc.strerror)
            return
        self.traffic.sent_packets += 1
        self.traffic.sent_bytes += len(packet)

    def keep_alive(self, now: float) -> None:
        """Send a keepalive for each pair whose key changed or that was quiet too long."""
        assert self.keepalive_s is not None
        for pair, keys in self.pairs.items():
            epoch = keys.active_epoch
            last_epoch, last = self._kept_alive.get(pair, (None, 0.0))
            if epoch is None or (epoch == last_epoch and now - last < self.keepalive_s):
                continue
            frame = keys.seal(b"", TYPE_KEEPALIVE)
            endpoint = self.endpoints.get(pair)
            if frame is not None and endpoint is not None:
                with contextlib.suppress(OSError):
                    self.sock.sendto(frame, endpoint)
                self._kept_alive[pair] = (epoch, now)

    def receive(self, frame: bytes, addr: Address) -> None:
        try:
            header = Header.parse(frame)
        except FrameError:
            self.traffic.drops[Drop.TRUNCATED] += 1
            return
        keys = self.pairs.get(header.pair)
        if keys is None:
            self.traffic.drops[Drop.UNKNOWN_PAIR] += 1
            return
        packet = keys.open(header, frame)
        if packet is None:
            return
        if self.learn and self.endpoints.get(header.pair) != addr:
            self.endpoints[header.pair] = addr
        if header.type == TYPE_KEEPALIVE:
            return
        if self.policy is not None and not self._allowed(packet, Direction.INBOUND, header.pair):
            return
        try:
            os.write(self.fd, packet)
        except OSError as exc:
            self.traffic.drops["tun_write_failed"] += 1
            log.debug("writing to the TUN device failed: %s", exc.strerror)
            return
        self.traffic.received_packets += 1
        self.traffic.received_bytes += len(packet)

    def _allowed(self, packet: bytes, direction: Direction, pair: int) -> bool:
        assert self.policy is not None
        verdict = self.policy.check(packet, direction)
        if verdict.allowed:
            return True
        self.traffic.drops[Drop.POLICY] += 1
        if verdict.resets is not None:
            to_client, to_server = verdict.resets
            # Inbound: the client is across the tunnel; outbound: it is local.
            remote, local = (to_client, to_server) if direction is Direction.INBOUND else \
                (to_server, to_client)
            self._send_remote(remote, pair)
            try:
                os.write(self.fd, local)
            except OSError:
                self.traffic.drops["tun_write_failed"] += 1
        return False

    def _send_remote(self, packet: bytes, pair: int) -> None:
        keys, endpoint = self.pairs.get(pair), self.endpoints.get(pair)
        frame = keys.seal(packet) if keys is not None else None
        if frame is not None and endpoint is not None:
            try:
                self.sock.sendto(frame, endpoint)
            except OSError:
                self.traffic.drops["send_failed"] += 1
