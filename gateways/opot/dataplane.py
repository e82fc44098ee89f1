"""The OPoT data plane: a layer-2 bump in the wire that stamps, updates or checks proofs.

Every node of a service function chain sits between two interfaces, `left` (towards the
source) and `right` (towards the destination), each opened as an AF_PACKET raw socket
(promiscuous, frames this socket sent itself ignored). The interfaces have no addresses;
only this program moves frames between them. Left to right, by role:

    ingress   every frame but ARP is chain traffic: it gets a proof (`Ingress.start`) and
              leaves as  dst MAC | src MAC | 0x894F | NSH (SI 255, next protocol Ethernet,
              one OPoT TLV) | the original frame.  No profile or mask key: dropped
              (fail closed, "no_key").
    transit   an NSH frame of our SPI gets this node's share (`Transit.forward`), SI and
              TTL minus one, the same outer MACs.  Frames without NSH pass: a service
              function does not police, the egress does.
    egress    an NSH frame of our SPI is verified (`Egress.verify`); if it holds, the inner
              Ethernet frame leaves, else it is dropped ("rejected"; the reason, e.g.
              replay, is in `Egress.rejected`).  Any other frame but ARP is dropped
              ("unproven": it bypassed the ingress).
    forward   everything passes unchanged: a plain wire, what a bypass looks like.

Right to left (the return direction) always passes unchanged ("return"): proof of transit
covers one direction, as in draft-ietf-sfc-proof-of-transit.

ARP is the one ethertype that passes every node as it is, so the chain is transparent at
layer 2 (hosts on both sides share a subnet). The ingress proves every other frame, not
only IPv4/IPv6, so that the egress can refuse whatever arrives without a proof
(VLAN-tagged IP, MPLS, PPPoE...) instead of keeping a list of ethertypes that carry IP.

Drops are counted by reason (`DROPS`), never raised out of the loop and never logged with
contents. The NSH header adds 54 bytes (Ethernet 14 + NSH 40): the links inside the chain
need an MTU 54 bytes above the hosts' (or the hosts a smaller one); a frame too big for
the outgoing interface is dropped ("too_big"). The hosts next to the chain must not hand
over frames with offloaded checksums or segmentation (checksum/TSO/GSO offload off on
their interfaces, GRO off on the nodes'): an AF_PACKET socket sees such frames unfinished.

One thread drains both sockets in batches and waits in poll() only when idle, as
`gateways.scada.tunnel` does. Run as a module (`python -m gateways.opot.dataplane`) it is a
test and demo harness with a static profile and static link keys (see `main`); the gateway
gets both from the controller and its KeySessions.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from gateways.opot.errors import InvalidProof, NotKeyed
from gateways.opot.masks import LinkKeys
from gateways.opot.pot import Controller, Egress, Ingress, Transit
from gateways.opot.wire import HEADER_LEN, NextProtocol, NshPot, WireError

log = logging.getLogger("qgw.gateway.opot")

ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
ETH_P_NSH = 0x894F
ETH_HLEN = 14
NSH_OVERHEAD = ETH_HLEN + HEADER_LEN      # 54 bytes added by the ingress
FIRST_SI = 255
ROLES = ("ingress", "transit", "egress", "forward")

MAX_FRAME = 65535
BATCH = 64            # frames taken from one side before looking at the other
IDLE_POLL_MS = 200
RCVBUF = 4 << 20

# Linux constants the socket module may lack.
SOL_PACKET = getattr(socket, "SOL_PACKET", 263)
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23               # Linux 4.20
_STATS = struct.Struct("II")              # struct tpacket_stats: packets, drops
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
PACKET_OUTGOING = getattr(socket, "PACKET_OUTGOING", 4)

_ARP = ETH_P_ARP.to_bytes(2, "big")
_NSH = ETH_P_NSH.to_bytes(2, "big")

# Counter keys of frames that did not go on, with why.
DROPS = frozenset({
    "no_key",        # ingress/transit: no active profile or mask key (fail closed)
    "invalid",       # transit: a proof it cannot process (unknown profile/phase, mode)
    "rejected",      # egress: the proof did not verify (reason in Egress.rejected)
    "unproven",      # egress: chain traffic without NSH, it bypassed the ingress
    "malformed",     # runt frame, garbled or truncated NSH, NSH not carrying Ethernet
    "other_path",    # NSH of another SPI
    "expired",       # NSH with SI or TTL exhausted
    "too_big",       # the frame exceeds the outgoing interface's MTU
    "send_failed",   # the outgoing interface refused it (buffer full, down...)
    "rx_dropped",    # the kernel dropped it: this node's socket buffer was full (too slow)
    "error",         # processing it raised (a bug): logged with its traceback
})


class ChainNode:
    """One node of a service function chain between interfaces `left` and `right`.

    `role` is "ingress", "transit", "egress" (with the matching `logic` from
    `gateways.opot.pot`) or "forward" (logic None). `process(frame)` is the pure
    left-to-right step; `start()` opens the sockets and runs the loop in a thread,
    `stop()` ends it. `counters` counts frames by outcome: "proved" (ingress),
    "forwarded" (transit), "verified" (egress), "passed" (left to right unchanged),
    "return" (right to left), and the drops in `DROPS`.
    """

    def __init__(self, role: str, left: str, right: str,
                 logic: Ingress | Transit | Egress | None, *, spi: int) -> None:
        expected = {"ingress": Ingress, "transit": Transit, "egress": Egress,
                    "forward": type(None)}.get(role)
        if expected is None:
            raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
        if not isinstance(logic, expected):
            raise ValueError(f"a {role} node needs {expected.__name__} logic, "
                             f"not {type(logic).__name__}")
        if not 0 <= spi < 1 << 24:
            raise ValueError("the SPI is 24 bits")
        if left == right:
            raise ValueError("left and right must be different interfaces")
        self.role = role
        self.left = left
        self.right = right
        self.logic = logic
        self.spi = spi
        self.counters: Counter[str] = Counter()
        steps: dict[str, Callable[[bytes], bytes | None]] = {
            "ingress": self._ingress, "transit": self._transit, "egress": self._egress,
            "forward": self._forward}
        self._step = steps[role]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socks: list[socket.socket] = []
        self._ignores_outgoing = False

    def __repr__(self) -> str:
        return f"ChainNode({self.role!r}, {self.left!r} -> {self.right!r}, spi={self.spi})"

    # -- left to right, per role (pure: frames in, frames out) ---------------------------------

    def process(self, frame: bytes) -> bytes | None:
        """The frame to send on the right for `frame` from the left; None: dropped (counted).

        No sockets involved; parse errors are counted, never raised.
        """
        return self._step(frame)

    def _ingress(self, frame: bytes) -> bytes | None:
        if len(frame) < ETH_HLEN:
            self.counters["malformed"] += 1
            return None
        if frame[12:14] == _ARP:
            self.counters["passed"] += 1
            return frame
        assert isinstance(self.logic, Ingress)
        try:
            proof = self.logic.start()
        except NotKeyed:
            self.counters["no_key"] += 1
            return None
        nsh = NshPot(self.spi, FIRST_SI, proof, NextProtocol.ETHERNET)
        self.counters["proved"] += 1
        return b"".join((frame[:12], _NSH, bytes(nsh), frame))

    def _parse(self, frame: bytes) -> NshPot | None:
        """The NSH header of an NSH frame of our path, or None (counted)."""
        try:
            nsh = NshPot.parse(memoryview(frame)[ETH_HLEN:])
        except WireError:
            self.counters["malformed"] += 1
            return None
        if nsh.spi != self.spi:
            self.counters["other_path"] += 1
            return None
        if nsh.si == 0 or nsh.ttl <= 1:
            self.counters["expired"] += 1
            return None
        return nsh

    def _transit(self, frame: bytes) -> bytes | None:
        if frame[12:14] != _NSH:
            if len(frame) < ETH_HLEN:
                self.counters["malformed"] += 1
                return None
            self.counters["passed"] += 1
            return frame
        nsh = self._parse(frame)
        if nsh is None:
            return None
        assert isinstance(self.logic, Transit)
        try:
            nsh.proof = self.logic.forward(nsh.proof)
        except InvalidProof:
            self.counters["invalid"] += 1
            return None
        except NotKeyed:
            self.counters["no_key"] += 1
            return None
        end = ETH_HLEN + nsh.length
        nsh.si -= 1
        nsh.ttl -= 1
        self.counters["forwarded"] += 1
        return frame[:ETH_HLEN] + bytes(nsh) + frame[end:]

    def _egress(self, frame: bytes) -> bytes | None:
        ethertype = frame[12:14]
        if ethertype == _ARP:
            self.counters["passed"] += 1
            return frame
        if ethertype != _NSH:
            self.counters["malformed" if len(frame) < ETH_HLEN else "unproven"] += 1
            return None
        nsh = self._parse(frame)
        if nsh is None:
            return None
        inner = ETH_HLEN + nsh.length
        if nsh.next_protocol != NextProtocol.ETHERNET or len(frame) < inner + ETH_HLEN:
            self.counters["malformed"] += 1
            return None
        assert isinstance(self.logic, Egress)
        try:
            self.logic.verify(nsh.proof)
        except InvalidProof:
            self.counters["rejected"] += 1
            return None
        except NotKeyed:
            self.counters["no_key"] += 1
            return None
        self.counters["verified"] += 1
        return frame[inner:]

    def _forward(self, frame: bytes) -> bytes | None:
        self.counters["passed"] += 1
        return frame

    # -- sockets and the loop --------------------------------------------------------------------

    def start(self) -> None:
        """Open both interfaces and run the loop in a thread (OSError if one cannot open)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        try:
            self._socks = [self._open(self.left), self._open(self.right)]
        except OSError:
            self._close()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"opot-{self.role}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        self._close()

    def _close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []

    def _open(self, ifname: str) -> socket.socket:
        # Protocol 0 until bound: no frames from other interfaces in between.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.bind((ifname, ETH_P_ALL))
            mreq = struct.pack("iHH8s", socket.if_nametoindex(ifname), PACKET_MR_PROMISC, 0,
                               b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            try:
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                self._ignores_outgoing = True
            except OSError:       # older kernel: recvfrom() and look at the packet type
                self._ignores_outgoing = False
            for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)
                    break
                except OSError:
                    continue
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _run(self) -> None:
        """Both directions in one thread (two busy threads would trade the GIL per frame)."""
        left, right = self._socks
        poller = select.poll()
        poller.register(left.fileno(), select.POLLIN)
        poller.register(right.fileno(), select.POLLIN)
        recv_left = self._receiver(left)
        recv_right = self._receiver(right)
        while not self._stop.is_set():
            moved = self._drain(recv_left, right.send, self._step)
            moved += self._drain(recv_right, left.send, self._return)
            if not moved:
                self._count_kernel_drops()
                poller.poll(IDLE_POLL_MS)
        self._count_kernel_drops()

    def _count_kernel_drops(self) -> None:
        """Add the frames the kernel dropped for want of buffer (reading resets them)."""
        for sock in self._socks:
            try:
                _, drops = _STATS.unpack(sock.getsockopt(SOL_PACKET, PACKET_STATISTICS,
                                                         _STATS.size))
            except OSError:
                continue
            if drops:
                self.counters["rx_dropped"] += drops

    def _return(self, frame: bytes) -> bytes:
        self.counters["return"] += 1
        return frame

    def _receiver(self, sock: socket.socket) -> Callable[[], bytes | None]:
        """recv() of incoming frames only: None for our own sends (seen on old kernels)."""
        if self._ignores_outgoing:
            recv = sock.recv
            return lambda: recv(MAX_FRAME)

        recvfrom = sock.recvfrom

        def receive() -> bytes | None:
            frame, addr = recvfrom(MAX_FRAME)
            return None if addr[2] == PACKET_OUTGOING else frame
        return receive

    def _drain(self, receive: Callable[[], bytes | None], send: Callable[[bytes], int],
               step: Callable[[bytes], bytes | None]) -> int:
        counters = self.counters
        for n in range(BATCH):
            try:
                frame = receive()
            except BlockingIOError:
                return n
            except OSError as exc:
                if not self._stop.is_set():
                    log.warning("receiving failed: %s", exc.strerror)
                return n
            if frame is None:
                continue
            try:
                out = step(frame)
            except Exception:
                # A bug met by one frame must not end the loop while the gateway still
                # reports running: drop the frame, count it, keep the traceback.
                counters["error"] += 1
                log.exception("dropping a frame the %s step failed on", self.role)
                continue
            if out is None:
                continue
            try:
                send(out)
            except OSError as exc:
                counters["too_big" if exc.errno == errno.EMSGSIZE else "send_failed"] += 1
        return BATCH


# -- test and demo harness --------------------------------------------------------------------


def _node_from_files(args: argparse.Namespace) -> ChainNode:
    """The node of `args`, keyed from the static profile and link keys (test/demo only)."""
    from keyclient.installer import SessionKey
    from keyclient.policy import KeySource
    from qgw.secret import Secret

    if args.role == "forward":
        return ChainNode("forward", args.left, args.right, None, spi=args.spi)
    if args.node is None or args.profile_json is None:
        raise SystemExit(f"a {args.role} node needs --node and --profile-json")
    spec = json.loads(Path(args.profile_json).read_text())
    nodes: Sequence[str] = spec["nodes"]
    path: str = spec.get("path", "")
    profile = Controller.make_profile(nodes, bytes.fromhex(spec["randomness"]),
                                      index=spec.get("index", 0), path=path)
    if args.node not in nodes:
        raise SystemExit(f"node {args.node!r} is not on the path {list(nodes)}")
    i = nodes.index(args.node)
    keys = json.loads(Path(args.links_json).read_text()) if args.links_json else {}

    def link(a: str, b: str) -> LinkKeys | None:
        if not args.ordered:
            return None
        name = f"{a}>{b}"
        if name not in keys:
            raise SystemExit(f"--links-json has no key for link {name}")
        lk = LinkKeys(path, a, b)
        lk.install(1, SessionKey(1, KeySource.QKD, f"static-{name}",
                                 Secret(bytes.fromhex(keys[name]))))
        lk.activate(1)
        return lk

    upstream = link(nodes[i - 1], nodes[i]) if i > 0 else None
    downstream = link(nodes[i], nodes[i + 1]) if i < len(nodes) - 1 else None
    logic: Ingress | Transit | Egress
    if args.role == "ingress":
        first = args.first_seq if args.first_seq is not None else time.time_ns() // 1000
        ingress = Ingress(args.node, ordered=args.ordered, downstream=downstream,
                          first_seq=first)
        ingress.install(profile.node(args.node))
        ingress.activate(profile.index)
        logic = ingress
    elif args.role == "transit":
        logic = Transit(args.node, ordered=args.ordered, upstream=upstream,
                        downstream=downstream)
        logic.install(profile.node(args.node))
    else:
        logic = Egress(args.node, ordered=args.ordered, upstream=upstream)
        logic.install(profile.verifier())
    return ChainNode(args.role, args.left, args.right, logic, spi=args.spi)


def _report(node: ChainNode, cpu_s: float) -> str:
    out: dict[str, object] = {"role": node.role, "counters": dict(node.counters),
                              "cpu_s": round(cpu_s, 3)}
    if isinstance(node.logic, Egress):
        out["rejected"] = dict(node.logic.rejected)
    return json.dumps(out, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m gateways.opot.dataplane --role R --left IF --right IF --spi N ...`

    A test/demo harness: the profile comes from --profile-json
    ({"path": P, "nodes": [ingress, ..., egress], "randomness": HEX (>= 32 bytes),
    "index": 0}) and, for ordered PoT, the link keys from --links-json
    ({"a>b": HEX (32 bytes), ...}, installed as epoch 1). The ingress numbers packets
    from --first-seq (default: microseconds since the epoch, so a restart never repeats
    a number). Prints {"ready": ...} once forwarding, the counters as one JSON line on
    SIGUSR1, and again on SIGTERM/SIGINT, then exits 0; "cpu_s" in that line is the CPU
    time spent since forwarding began (frames / cpu_s = what one core would forward).
    """
    p = argparse.ArgumentParser(prog="python -m gateways.opot.dataplane",
                                description="OPoT chain node (test/demo harness)")
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--left", required=True, help="interface towards the source")
    p.add_argument("--right", required=True, help="interface towards the destination")
    p.add_argument("--spi", type=int, required=True, help="service path identifier")
    p.add_argument("--node", help="this node's name on the path")
    p.add_argument("--profile-json", help="the static test profile")
    p.add_argument("--links-json", help="static link keys (ordered PoT)")
    p.add_argument("--first-seq", type=int, help="the ingress's first sequence number")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ordered", dest="ordered", action="store_true", default=True,
                      help="ordered PoT, CML masked per link (default)")
    mode.add_argument("--plain", dest="ordered", action="store_false",
                      help="plain (unordered) PoT")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        node = _node_from_files(args)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    done = threading.Event()
    cpu_start = time.process_time()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            print(_report(node, time.process_time() - cpu_start), flush=True)
        else:
            done.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    try:
        node.start()
    except OSError as exc:
        print(f"error: opening {args.left}/{args.right}: {exc.strerror}", file=sys.stderr)
        return 2
    cpu_start = time.process_time()
    print(json.dumps({"ready": True, "role": node.role, "node": args.node}), flush=True)
    while not done.wait(1.0):
        pass
    node.stop()
    print(_report(node, time.process_time() - cpu_start), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
