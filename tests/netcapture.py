"""Capture the frames seen in a network namespace: `python -m tests.netcapture OUT SECONDS [IF]`.

Run inside the namespace (`ip netns exec NS ...`); with IF, only that
interface's frames (e.g. a gateway's transit link, not its site LAN). Writes length-prefixed raw
Ethernet frames to OUT until SECONDS pass or SIGTERM. Tests read them back
with `read_frames` and look for what must never travel in clear.
"""

from __future__ import annotations

import signal
import socket
import struct
import sys
import time
from pathlib import Path

ETH_P_ALL = 0x0003


def capture(out: Path, seconds: float, interface: str | None = None) -> int:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    if interface is not None:
        sock.bind((interface, ETH_P_ALL))
    sock.settimeout(0.2)
    stop = time.monotonic() + seconds
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    count = 0
    with out.open("wb") as f:
        print("capturing", flush=True)
        while time.monotonic() < stop:
            try:
                frame = sock.recv(65535)
            except TimeoutError:
                continue
            f.write(struct.pack("!I", len(frame)) + frame)
            f.flush()
            count += 1
    return count


def read_frames(path: Path) -> list[bytes]:
    data = path.read_bytes()
    frames, i = [], 0
    while i + 4 <= len(data):
        (n,) = struct.unpack_from("!I", data, i)
        frames.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return frames


def udp_tcp_ports(frame: bytes) -> tuple[int, int, int] | None:
    """(IP protocol, source port, destination port) of an IPv4 Ethernet frame."""
    if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[14 + 9]
    if proto not in (6, 17) or len(frame) < 14 + ihl + 4:
        return None
    sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
    return proto, sport, dport


if __name__ == "__main__":
    iface = sys.argv[3] if len(sys.argv) > 3 else None
    print(f"captured {capture(Path(sys.argv[1]), float(sys.argv[2]), iface)} frames", flush=True)
