"""The data plane: IP packets between the TUN device and UDP, sealed per gateway pair.

One thread for both directions, with non-blocking I/O that waits in poll()
only when idle. Key changes come from the KeySession threads through `PairKeys`.

- outbound (TUN -> UDP): the destination address picks the pair (the control
  centre routes each substation's prefixes to its pair; a substation has one
  pair), the Modbus policy may refuse, `PairKeys.seal_into` encrypts or drops.
- inbound (UDP -> TUN): the header names pair and epoch; `PairKeys.open_into`
  authenticates and checks replay; the Modbus policy may refuse; the packet is
  written to the TUN device. The control centre learns a substation's current
  address from its last authentic packet; substations send a sealed keepalive
  whenever they get a new key and when idle for KEEPALIVE_S, so a substation
  without a configured address, or behind NAT, or restarted, is found again.

Per packet the cost is Python's and the kernel's, not the cipher's, so the
hot path avoids both where it can:
- packets are read into, sealed into and opened into buffers allocated once;
- a side is drained only when poll() says it is ready, so no read fails on
  the idle side (a BlockingIOError costs CPython several times the read);
- the frames a burst on the TUN device produces for one peer leave in one
  sendmsg with UDP GSO (the kernel cuts the buffer into the same datagrams,
  one frame each, that separate sends would make), and the receiving socket
  asks for UDP GRO, so a burst arrives in one recvmsg. The first packet of
  each wake-up is sent at once and a batch goes as soon as the TUN device has
  nothing more, so a lone packet (a Modbus request) waits for no other.
There is no busy-polling after traffic: on a 2-core machine every spin (100-200
us) made the Modbus round trip slower, the spinning gateways taking the CPU the
HMI, the PLC and the other gateway needed.

A refused Modbus request is dropped and both TCP ends are reset (the client's
reset travels back through the tunnel, sealed like any packet).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import select
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from gateways.scada.frame import HEADER, OVERHEAD, TYPE_KEEPALIVE, TYPES, VERSION
from gateways.scada.keys import Buffer, Drop, PairKeys
from gateways.scada.modbus import Direction, ModbusFilter

log = logging.getLogger("qgw.gateway.scada")

MAX_PACKET = 65535
IDLE_POLL_MS = 200
BATCH = 64  # reads from one side before looking at the other
KEEPALIVE_S = 10.0
KEEPALIVE_CHECK_S = 0.2  # a busy loop still notices a new key this often
# UDP GSO/GRO (linux/udp.h; Linux 4.18 / 5.0). One GSO send carries at most 64
# segments (UDP_MAX_SEGMENTS on older kernels) in one IP datagram's worth of bytes.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
GSO_FAILED = (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT)
RX_BUFFER = 1 << 17  # a GRO burst is at most 64 KiB; twice that never truncates
GRO_ANCILLARY = socket.CMSG_SPACE(4)
_unpack_header = HEADER.unpack_from

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


class _Outbox:
    """Sealed frames waiting to leave in one UDP GSO send.

    GSO splits the buffer into datagrams of the first frame's size (the last may
    be shorter), so frames join only while they go to the same peer and none is
    larger than the first; a shorter one ends the batch.
    """

    def __init__(self) -> None:
        self.buf = bytearray(GSO_MAX_BYTES + MAX_PACKET + OVERHEAD)
        self.view = memoryview(self.buf)
        self.clear()

    def clear(self) -> None:
        self.end = 0
        self.count = 0
        self.size = 0
        self.plain = 0
        self.endpoint: Address | None = None
        self.closed = False

    def fits(self, endpoint: Address, size: int) -> bool:
        return (endpoint == self.endpoint and not self.closed and size <= self.size
                and self.count < GSO_MAX_SEGMENTS and self.end + size <= GSO_MAX_BYTES)


class Tunnel:
    def __init__(self, tun_fd: int, sock: socket.socket, pairs: dict[int, PairKeys],
                 routes: Sequence[Route], endpoints: dict[int, Address | None],
                 policy: ModbusFilter | None = None, *, learn_endpoints: bool = False,
                 keepalive_s: float | None = None, batching: bool = True) -> None:
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
        # Buffers of the data thread, allocated once: a packet read from the TUN
        # device, frames on their way out, a datagram (or GRO burst) received, and
        # the packet opened from it.
        self._packet = bytearray(MAX_PACKET)
        self._packet_view = memoryview(self._packet)
        self._packet_bufs = [self._packet]
        self._outbox = _Outbox()
        self._rx = bytearray(RX_BUFFER)
        self._rx_view = memoryview(self._rx)
        self._plain = bytearray(RX_BUFFER)
        self._plain_view = memoryview(self._plain)
        self.gso = batching and _enable(sock, UDP_SEGMENT, probe=True)
        self.gro = batching and _enable(sock, UDP_GRO)

    def start(self) -> None:
        t = threading.Thread(target=self._run, name="scada-data", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)

    # -- routing -------------------------------------------------------------------

    def pair_for(self, packet: Buffer) -> int | None:
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
        """Both directions in one thread: drain the sides poll() says are ready.

        One thread, not one per direction: two busy Python threads in one process
        hand the GIL back and forth on every packet, which cost more than the
        crypto (measured: 2-3x fewer packets per second). A side is drained until
        EAGAIN only when poll() named it: a BlockingIOError costs CPython more than
        the read, and a poll() per packet cost more still (measured: twice the
        CPU per byte of draining).
        """
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN)
        poll, tun_fd = poller.poll, self.fd
        clock = time.monotonic
        next_keepalive = 0.0
        while not self._stop.is_set():
            ready = poll(IDLE_POLL_MS)
            for fd, _events in ready:
                if fd == tun_fd:
                    self._drain_tun()
                else:
                    self._drain_udp()
            now = clock()
            if self.keepalive_s is not None and (not ready or now >= next_keepalive):
                self.keep_alive(now)
                next_keepalive = now + KEEPALIVE_CHECK_S

    def _drain_tun(self) -> None:
        """Read the TUN device until it is empty (or BATCH packets), sealing as it goes.

        The first packet is sent at once (a Modbus request waits for nothing);
        those behind it in a burst join a GSO batch, sent when the device is empty.
        """
        read, fd, bufs, view = os.readv, self.fd, self._packet_bufs, self._packet_view
        try:
            for n in range(BATCH):
                try:
                    size = read(fd, bufs)
                except BlockingIOError:
                    return
                except OSError as exc:
                    if not self._stop.is_set():
                        log.error("reading the TUN device failed: %s", exc.strerror)
                    return
                self._queue(view[:size])
                if n == 0:
                    self.flush()
        finally:
            self.flush()

    def _drain_udp(self) -> None:
        for _ in range(BATCH):
            if not self._read_udp():
                return

    def _read_udp(self) -> bool:
        """Receive one datagram (or GRO burst) and deliver its frames; False when empty."""
        view = self._rx_view
        try:
            if self.gro:
                size, ancillary, flags, addr = self.sock.recvmsg_into([view], GRO_ANCILLARY)
            else:
                size, addr = self.sock.recvfrom_into(view)
                ancillary, flags = [], 0
        except BlockingIOError:
            return False
        except OSError as exc:
            log.debug("receiving failed: %s", exc.strerror)  # e.g. ICMP unreachable
            return False
        if flags & socket.MSG_TRUNC:
            self.traffic.drops[Drop.TRUNCATED] += 1
            return True
        segment = size
        for level, kind, data in ancillary:
            if level == SOL_UDP and kind == UDP_GRO:
                segment = int.from_bytes(data[:4], sys.byteorder) or size
        out = self._plain_view
        if segment >= size:
            self._receive(view[:size], addr, out)
        else:
            for offset in range(0, size, segment):
                self._receive(view[offset:min(offset + segment, size)], addr, out)
        return True

    def send(self, packet: Buffer, pair: int | None = None) -> None:
        """Seal one packet from the local site and send it to its pair's peer."""
        self._queue(memoryview(packet), pair)
        self.flush()

    def _queue(self, packet: memoryview, pair: int | None = None) -> None:
        """Seal one packet into the outbox; `flush` sends it (the data thread's `send`)."""
        if pair is None:
            pair = self._single if self._single is not None else self.pair_for(packet)
        keys = self.pairs.get(pair) if pair is not None else None
        if keys is None or pair is None:
            self.traffic.drops[Drop.NO_ROUTE] += 1
            return
        if self.policy is not None and not self._allowed(bytes(packet), Direction.OUTBOUND,
                                                         pair):
            return
        endpoint = self.endpoints.get(pair)
        if endpoint is None:
            if keys.active_epoch is None:
                keys.drops[Drop.NO_KEY] += 1
            else:
                self.traffic.drops[Drop.NO_ROUTE] += 1
            return
        box = self._outbox
        size = len(packet) + OVERHEAD
        if box.count and not (self.gso and box.fits(endpoint, size)):
            self.flush()
        n = keys.seal_into(packet, box.view[box.end:])
        if n is None:
            return
        if box.count == 0:
            box.size, box.endpoint = n, endpoint
        elif n < box.size:
            box.closed = True
        box.end += n
        box.count += 1
        box.plain += n - OVERHEAD

    def flush(self) -> None:
        """Send the outbox: one datagram, or one GSO send of several."""
        box = self._outbox
        if not box.count:
            return
        endpoint = box.endpoint
        assert endpoint is not None
        frames = box.view[:box.end]
        try:
            if box.count == 1:
                self.sock.sendto(frames, endpoint)
            else:
                self.sock.sendmsg([frames], [(SOL_UDP, UDP_SEGMENT,
                                              box.size.to_bytes(2, sys.byteorder))],
                                  0, endpoint)
        except BlockingIOError:
            self.traffic.drops["send_buffer_full"] += box.count
        except OSError as exc:
            if box.count > 1 and exc.errno in GSO_FAILED:
                # e.g. an egress device without checksum offload: send one by one
                log.info("UDP GSO refused (%s): sending datagrams one by one",
                         exc.strerror)
                self.gso = False
                self._send_each(frames, box.size, endpoint)
            else:
                self.traffic.drops["send_failed"] += box.count
                log.debug("sending to %s failed: %s", endpoint[0], exc.strerror)
        else:
            self.traffic.sent_packets += box.count
            self.traffic.sent_bytes += box.plain
        finally:
            box.clear()

    def _send_each(self, frames: memoryview, size: int, endpoint: Address) -> None:
        for offset in range(0, len(frames), size):
            frame = frames[offset:offset + size]
            try:
                self.sock.sendto(frame, endpoint)
            except OSError:
                self.traffic.drops["send_failed"] += 1
                continue
            self.traffic.sent_packets += 1
            self.traffic.sent_bytes += len(frame) - OVERHEAD

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

    def receive(self, frame: Buffer, addr: Address) -> None:
        """Open one frame from the peer and deliver its packet to the local site."""
        self._receive(memoryview(frame), addr,
                      memoryview(bytearray(max(len(frame) - OVERHEAD, 0))))

    def _receive(self, frame: memoryview, addr: Address, out: memoryview) -> None:
        # Header.parse inlined: a tuple instead of a NamedTuple per packet
        if len(frame) < OVERHEAD:
            self.traffic.drops[Drop.TRUNCATED] += 1
            return
        version, kind, pair, epoch, seq = _unpack_header(frame)
        if version != VERSION or kind not in TYPES:
            self.traffic.drops[Drop.TRUNCATED] += 1
            return
        keys = self.pairs.get(pair)
        if keys is None:
            self.traffic.drops[Drop.UNKNOWN_PAIR] += 1
            return
        size = keys.open_into(epoch, seq, frame, out)
        if size is None:
            return
        if self.learn and self.endpoints.get(pair) != addr:
            self.endpoints[pair] = addr
        if kind == TYPE_KEEPALIVE:
            return
        packet = out[:size]
        if self.policy is not None and not self._allowed(bytes(packet), Direction.INBOUND, pair):
            return
        try:
            os.write(self.fd, packet)
        except OSError as exc:
            self.traffic.drops["tun_write_failed"] += 1
            log.debug("writing to the TUN device failed: %s", exc.strerror)
            return
        traffic = self.traffic
        traffic.received_packets += 1
        traffic.received_bytes += size

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
        self.flush()  # what was sealed before goes first
        keys, endpoint = self.pairs.get(pair), self.endpoints.get(pair)
        frame = keys.seal(packet) if keys is not None else None
        if frame is not None and endpoint is not None:
            try:
                self.sock.sendto(frame, endpoint)
            except OSError:
                self.traffic.drops["send_failed"] += 1


def _enable(sock: socket.socket, option: int, *, probe: bool = False) -> bool:
    """Whether the kernel offers UDP option `option` on `sock` (set to 1 unless `probe`)."""
    if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        if probe:
            sock.getsockopt(SOL_UDP, option)
        else:
            sock.setsockopt(SOL_UDP, option, 1)
    except OSError:
        return False
    return True
