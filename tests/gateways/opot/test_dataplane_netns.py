"""The OPoT chain on real interfaces: client -> ingress -> sf1 -> sf2 -> egress -> server.

Six network namespaces joined in a line by veth pairs; each node runs
`python -m gateways.opot.dataplane` between its `left` and `right` interfaces with a shared
static profile and static link keys. Client (10.88.0.1) and server (10.88.0.2) share a
subnet: the chain is transparent at layer 2 (ARP passes), and proofs travel only on the
links inside it (MTU 1600 for the 54 bytes of Ethernet + NSH).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateways.opot.dataplane import DROPS
from gateways.opot.wire import NshPot
from qgw.netlab import Lab, unavailable

pytestmark = pytest.mark.netns

PY = sys.executable
NODES = ("ingress", "sf1", "sf2", "egress")      # path order, as in the profile
SITES = ("client", *NODES, "server")
SPI = 42
CLIENT, SERVER = "10.88.0.1", "10.88.0.2"
PORT = 7000

# Helpers run inside the namespaces (`python TOOLS CMD ...`).
TOOLS = r'''
import ctypes, fcntl, json, signal, socket, struct, sys, time

def offload_off(*ifnames):
    # ETHTOOL_STXCSUM, ETHTOOL_SSG, ETHTOOL_STSO, ETHTOOL_SGSO, ETHTOOL_SGRO (no ethtool here)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for ifname in ifnames:
        for cmd in (0x17, 0x19, 0x1f, 0x24, 0x2c):
            buf = ctypes.create_string_buffer(struct.pack("II", cmd, 0))
            fcntl.ioctl(s, 0x8946, struct.pack("16sQ16x", ifname.encode(),
                                               ctypes.addressof(buf)))

def udp_recv(port):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(("0.0.0.0", int(port)))
    s.settimeout(0.1)
    count, first, last, seen = 0, None, None, set()
    print("ready", flush=True)
    while not stop:
        try:
            data = s.recv(2048)
        except (TimeoutError, InterruptedError):
            continue
        last = time.monotonic()
        first = first or last
        count += 1
        seen.add(data[:16])
    print(json.dumps({"count": count, "distinct": len(seen),
                      "seconds": (last - first) if count > 1 else 0}), flush=True)

def udp_send(dst, port, n, size, tag):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pad = b"x" * max(0, int(size) - 16)
    t = time.monotonic()
    for i in range(int(n)):
        s.sendto(b"%s%08d" % (tag.encode()[:8].ljust(8), i) + pad, (dst, int(port)))
        if i % 64 == 63:
            time.sleep(0)
    print(json.dumps({"sent": int(n), "seconds": time.monotonic() - t}), flush=True)

def tcp_echo(port):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv = socket.create_server(("0.0.0.0", int(port)))
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

def tcp_client(dst, port, size):
    data = bytes(range(256)) * (int(size) // 256)
    with socket.create_connection((dst, int(port)), timeout=5) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(65536):
            got += chunk
    print(json.dumps({"echoed": got == data, "bytes": len(got)}), flush=True)

def capture(ifname, out, seconds):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x894F))
    s.bind((ifname, 0x894F))
    s.settimeout(float(seconds))
    print("ready", flush=True)
    while True:
        frame, addr = s.recvfrom(65535)
        if addr[2] != socket.PACKET_OUTGOING:
            open(out, "wb").write(frame)
            return

def inject(ifname, path):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.bind((ifname, 0))
    s.send(open(path, "rb").read())

globals()[sys.argv[1].replace("-", "_")](*sys.argv[2:])
'''


@dataclass
class ChainLab:
    lab: Lab
    tmp: Path
    tools: Path
    profile: Path
    links: Path
    run: int = 0

    def ns(self, site: str) -> str:
        return self.lab.namespaces[site]

    def tool(self, site: str, *args: str, timeout_s: float = 20) -> dict[str, object]:
        out = self.lab.output(site, [PY, str(self.tools), *args], timeout_s)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.splitlines()[-1]) if out.stdout.strip() else {}

    def start(self, name: str, site: str, argv: list[str], ready: str) -> str:
        """Start a long-running process in `site` and wait until it prints `ready`."""
        self.run += 1
        service = f"{name}-{self.run}"
        self.lab.start(service, argv, env=None, ns_of=site)
        wait_for(lambda: ready in self.lab.tail(service), f"{service} ready",
                 lambda: self.lab.tail(service))
        return service

    def stop(self, service: str) -> dict[str, object]:
        """SIGTERM a process and return the last JSON line it printed."""
        self.lab.kill(service, signal.SIGTERM)
        lines = [line for line in self.lab.tail(service).splitlines() if line.startswith("{")]
        assert lines, self.lab.tail(service)
        result: dict[str, object] = json.loads(lines[-1])
        return result

    def node(self, position: str, role: str, identity: str | None = None,
             *, ordered: bool = True) -> str:
        argv = [PY, "-m", "gateways.opot.dataplane", "--role", role, "--left", "left",
                "--right", "right", "--spi", str(SPI)]
        if role != "forward":
            argv += ["--node", identity or position, "--profile-json", str(self.profile),
                     "--links-json", str(self.links), "--ordered" if ordered else "--plain"]
        return self.start(f"node-{position}", position, argv, '"ready": true')

    def udp(self, n: int, *, size: int = 64, tag: str = "udp") -> dict[str, object]:
        """Send n datagrams client -> server; what the server received."""
        receiver = self.start("udp-recv", "server", [PY, str(self.tools), "udp-recv",
                                                     str(PORT)], "ready")
        sent = self.tool("client", "udp-send", SERVER, str(PORT), str(n), str(size), tag)
        time.sleep(0.5)
        got = self.stop(receiver)
        got["sender_seconds"] = sent["seconds"]
        return got


def wait_for(cond: object, what: str, detail: object = None, timeout_s: float = 15) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            more = detail() if callable(detail) else ""
            raise AssertionError(f"timed out waiting for {what}\n{more}")
        time.sleep(0.05)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChainLab]:
    reason = unavailable()
    if reason is not None:
        pytest.fail(f"this test needs root and iproute2 ({reason}); CI provides both: .ci/run")
    tmp = tmp_path_factory.mktemp("opot")
    lab = Lab(tmp)
    try:
        lab.setup(list(SITES))
        for site in SITES:    # no IPv6 chatter (router solicitations, MLD) on the chain
            ip("netns", "exec", lab.namespaces[site], "sysctl", "-qw",
               "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        ends = [("client", "eth1"), *[(n, side) for n in NODES for side in ("left", "right")],
                ("server", "eth1")]
        for (a, a_if), (b, b_if) in zip(ends[::2], ends[1::2], strict=True):
            inside = a in NODES and b in NODES
            ip("-n", lab.namespaces[a], "link", "add", a_if, *(["mtu", "1600"] if inside else []),
               "type", "veth", "peer", "name", b_if, "netns", lab.namespaces[b],
               *(["mtu", "1600"] if inside else []))
        for site, ifname in ends:
            ip("-n", lab.namespaces[site], "link", "set", ifname, "up")
        ip("-n", lab.namespaces["client"], "addr", "add", f"{CLIENT}/24", "dev", "eth1")
        ip("-n", lab.namespaces["server"], "addr", "add", f"{SERVER}/24", "dev", "eth1")
        tools = tmp / "tools.py"
        tools.write_text(TOOLS)
        for site in ("client", "server"):
            out = lab.output(site, [PY, str(tools), "offload-off", "eth1"], 10)
            assert out.returncode == 0, out.stderr
        profile = tmp / "profile.json"
        profile.write_text(json.dumps({"path": "netns", "nodes": list(NODES),
                                       "randomness": os.urandom(32).hex(), "index": 0}))
        links = tmp / "links.json"
        links.write_text(json.dumps({f"{a}>{b}": os.urandom(32).hex()
                                     for a, b in itertools.pairwise(NODES)}))
        yield ChainLab(lab, tmp, tools, profile, links)
    finally:
        errors = lab.cleanup()
        leftover = [ns for ns in (*lab.namespaces.values(), lab.bridge_ns)
                    if ns and (Path("/run/netns") / ns).exists()]
        assert not errors and not leftover, f"cleanup: {errors} {leftover}"


class Running:
    """The four node processes of one scenario; `stop()` gives each one's report."""

    def __init__(self, c: ChainLab, roles: dict[str, tuple[str, str | None]], *,
                 ordered: bool = True) -> None:
        self.c = c
        self.services = {pos: c.node(pos, role, identity, ordered=ordered)
                         for pos, (role, identity) in roles.items()}

    def stop(self) -> dict[str, dict[str, object]]:
        return {pos: self.c.stop(service) for pos, service in self.services.items()}


def normal() -> dict[str, tuple[str, str | None]]:
    return {"ingress": ("ingress", None), "sf1": ("transit", None), "sf2": ("transit", None),
            "egress": ("egress", None)}


def counters(report: dict[str, object]) -> dict[str, int]:
    c = report["counters"]
    assert isinstance(c, dict)
    return c


def test_udp_and_tcp_cross_the_ordered_chain_and_the_egress_verifies(chain: ChainLab) -> None:
    nodes = Running(chain, normal())
    try:
        got = chain.udp(200)
        echo = chain.start("tcp-echo", "server", [PY, str(chain.tools), "tcp-echo", str(PORT)],
                           "ready")
        reply = chain.tool("client", "tcp-client", SERVER, str(PORT), str(256 * 1024))
        chain.lab.kill(echo, signal.SIGTERM)
    finally:
        reports = nodes.stop()
    assert got["count"] == got["distinct"] == 200
    assert reply == {"echoed": True, "bytes": 256 * 1024}
    ingress, egress = counters(reports["ingress"]), counters(reports["egress"])
    assert egress["verified"] == ingress["proved"] > 200          # UDP and the TCP segments
    assert counters(reports["sf1"])["forwarded"] == counters(reports["sf2"])["forwarded"] \
        == ingress["proved"]
    assert reports["egress"]["rejected"] == {}
    assert not set(egress) - {"verified", "passed", "return"}     # nothing dropped
    assert egress["return"] > 100                                  # the replies


def test_packets_per_second(chain: ChainLab, record_property: object) -> None:
    """A UDP flood: what reaches the server, and what each node forwards per CPU second.

    Six processes (sender, four nodes, receiver) share the machine's cores, so the end-to-end
    rate is the contended one; frames / CPU seconds is what one node does on one core.
    """
    nodes = Running(chain, normal())
    n = 20000
    try:
        got = chain.udp(n, size=64, tag="flood")
    finally:
        reports = nodes.stop()
    count, seconds = int(str(got["count"])), float(str(got["seconds"]))
    end_to_end = count / seconds if seconds else 0.0
    per_node = {}
    for pos, report in reports.items():
        frames = sum(v for k, v in counters(report).items() if k != "rx_dropped")
        cpu = float(str(report["cpu_s"]))
        per_node[pos] = round(frames / cpu) if cpu else 0
    drops = {pos: {k: v for k, v in counters(r).items() if k in DROPS}
             for pos, r in reports.items()}
    print(f"\nOPoT chain, ordered, {os.cpu_count()} cores: {count}/{n} datagrams at the server "
          f"in {seconds:.2f} s = {end_to_end:.0f}/s end to end; egress verified "
          f"{counters(reports['egress']).get('verified', 0)}; frames per CPU second by node "
          f"{per_node}; drops {drops}")
    assert callable(record_property)
    record_property("end_to_end_packets_per_second", round(end_to_end))
    record_property("node_packets_per_cpu_second", per_node)
    assert count > n // 4 and reports["egress"]["rejected"] == {}
    assert not set(counters(reports["egress"])) & (DROPS - {"rx_dropped"})


def test_a_bypassed_service_function_is_rejected(chain: ChainLab) -> None:
    roles = normal()
    roles["sf1"] = ("forward", None)
    nodes = Running(chain, roles)
    try:
        got = chain.udp(50)
    finally:
        reports = nodes.stop()
    assert got["count"] == 0
    assert counters(reports["egress"])["rejected"] == 50
    assert "verified" not in counters(reports["egress"])
    assert reports["egress"]["rejected"] == {"proof": 50}


def test_swapped_service_functions_fail_ordered_but_pass_plain_pot(chain: ChainLab) -> None:
    # The packet meets SF2's function (share and link keys) before SF1's.
    swapped = normal()
    swapped["sf1"], swapped["sf2"] = ("transit", "sf2"), ("transit", "sf1")
    results = {}
    for ordered in (True, False):
        nodes = Running(chain, swapped, ordered=ordered)
        try:
            got = chain.udp(50, tag="swap")
        finally:
            reports = nodes.stop()
        results[ordered] = (got["count"], counters(reports["egress"]))
    assert results[True][0] == 0 and results[True][1]["rejected"] == 50
    assert results[False][0] == 50 and results[False][1]["verified"] == 50
    assert "rejected" not in results[False][1]


def forged(frame: bytes, *, seq_ahead: int, cml_xor: int = 0) -> bytes:
    """`frame` with its proof moved to a sequence number not seen yet (and its CML altered):
    what an attacker on the last link can make without the chain's secrets."""
    nsh = NshPot.parse(frame[14:])
    nsh.proof = nsh.proof._replace(seq=nsh.proof.seq + seq_ahead,
                                   cml=nsh.proof.cml ^ cml_xor)
    return frame[:14] + bytes(nsh) + frame[14 + nsh.length:]


def test_a_replayed_or_forged_frame_is_rejected(chain: ChainLab) -> None:
    nodes = Running(chain, normal())
    frame = chain.tmp / "captured.bin"
    try:
        chain.udp(5, tag="warm")                   # ARP resolved before the capture
        cap = chain.start("capture", "egress", [PY, str(chain.tools), "capture", "left",
                                                str(frame), "10"], "ready")
        receiver = chain.start("udp-recv", "server", [PY, str(chain.tools), "udp-recv",
                                                      str(PORT)], "ready")
        chain.tool("client", "udp-send", SERVER, str(PORT), "1", "64", "original")
        wait_for(frame.exists, "the captured NSH frame", lambda: chain.lab.tail(cap))
        chain.lab.procs.pop(cap).wait(timeout=5)
        # Re-inject it where it came from: sf2's right side, the egress's left.
        out = chain.lab.output("sf2", [PY, str(chain.tools), "inject", "right", str(frame)], 10)
        assert out.returncode == 0, out.stderr
        # Forged: the same proof under a fresh sequence number, and one with a CML bit flipped.
        for n, (ahead, flip) in enumerate([(1000, 0), (2000, 1)]):
            fake = chain.tmp / f"forged{n}.bin"
            fake.write_bytes(forged(frame.read_bytes(), seq_ahead=ahead, cml_xor=flip))
            out = chain.lab.output("sf2", [PY, str(chain.tools), "inject", "right", str(fake)],
                                   10)
            assert out.returncode == 0, out.stderr
        time.sleep(0.5)
        got = chain.stop(receiver)
    finally:
        reports = nodes.stop()
    assert frame.read_bytes()[12:14] == b"\x89\x4f"
    assert got["count"] == 1
    assert reports["egress"]["rejected"] == {"replay": 1, "proof": 2}
    assert counters(reports["egress"])["verified"] == 6
