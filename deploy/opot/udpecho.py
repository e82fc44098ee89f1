"""The two ends of the `opot` compose profile's chain: a UDP echo server and a client that
sends a bounded stream through the chain and exits 0 only if every datagram came back.

    python /etc/qgw/udpecho.py server 10.88.0.2/24
    python /etc/qgw/udpecho.py client 10.88.0.1/24 10.88.0.2 --count 500

The chain is transparent at layer 2, so both ends take an address of one subnet on their
`data` interface (the one on their hop network), as in gateways/opot/lab.py, and have the
kernel compute checksums instead of leaving them to veth offload (an AF_PACKET node would
forward them unfinished). Both need NET_ADMIN. The return direction crosses the chain
unproven, so an echo shows its datagram passed the egress's verification.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import socket
import struct
import time

PORT = 9000
SIOCETHTOOL, ETHTOOL_STXCSUM = 0x8946, 0x17


def prepare(ifname: str, address: str) -> str:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    ip, _, prefixlen = address.partition("/")
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        ipr.link("set", index=index, state="up")
        try:
            ipr.addr("add", index=index, address=ip, prefixlen=int(prefixlen or 24))
        except NetlinkError as exc:   # a restarted container keeps its address
            if exc.code != errno.EEXIST:
                raise
    value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0))
    with socket.socket() as s:
        fcntl.ioctl(s, SIOCETHTOOL, struct.pack("16sP", ifname.encode(),
                                                ctypes.addressof(value)))
    return ip


def server(ip: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, PORT))
    print(f"echoing on {ip}:{PORT}", flush=True)
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)


def client(ip: str, target: str, count: int, rate: float, wait_s: float) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 0))
    dest = (target, PORT)
    # Until the chain carries (profiles pushed, link keys agreed): one probe at a time.
    deadline = time.monotonic() + wait_s
    s.settimeout(0.5)
    while True:
        s.sendto(b"probe", dest)
        try:
            if s.recv(2048) == b"probe":
                break
        except TimeoutError:
            if time.monotonic() > deadline:
                print(f"FAIL: no echo through the chain within {wait_s:.0f} s", flush=True)
                return 1
    print(f"chain up after {wait_s - (deadline - time.monotonic()):.1f} s", flush=True)
    seen: set[int] = set()
    s.setblocking(False)
    start = time.monotonic()

    def drain() -> None:
        while True:
            try:
                data = s.recv(2048)
            except BlockingIOError:
                return
            if data[:3] == b"seq":
                seen.add(int(data[3:11]))

    for i in range(count):
        s.sendto(b"seq%08d" % i + bytes(200), dest)
        drain()
        time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
    end = time.monotonic() + 5
    while len(seen) < count and time.monotonic() < end:
        time.sleep(0.05)
        drain()
    ok = seen == set(range(count))
    print(f"{'OK' if ok else 'FAIL'}: {len(seen)}/{count} datagrams came back through the "
          f"chain", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["server", "client"])
    parser.add_argument("address", help="ADDRESS/PREFIXLEN for the data interface")
    parser.add_argument("target", nargs="?", help="the server's address (client)")
    parser.add_argument("--interface", default="data")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--rate", type=float, default=200.0, help="datagrams per second")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the chain to carry a first datagram")
    opts = parser.parse_args(argv)
    ip = prepare(opts.interface, opts.address)
    if opts.mode == "server":
        server(ip)
        return 0
    if opts.target is None:
        parser.error("the client needs the server's address")
    return client(ip, opts.target, opts.count, opts.rate, opts.wait)


if __name__ == "__main__":
    raise SystemExit(main())
