"""A numbered UDP stream: count what a path loses, duplicates or reorders.

    python -m apps.udpstream receive --bind 10.2.0.2:9000 --idle 3
    python -m apps.udpstream send --to 10.2.0.2:9000 --rate 500 --count 10000

Each datagram starts with an 8-byte sequence number. The receiver prints one
JSON line when the stream goes idle after its first datagram (or on SIGTERM,
or when nothing came within --wait): received, distinct,
duplicates, lost (numbers up to the highest seen that never came), reordered,
and the longest run of consecutive losses.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import time
from typing import Any


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def send(to: tuple[str, int], count: int, rate: float, size: int) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET6 if ":" in to[0] else socket.AF_INET, socket.SOCK_DGRAM)
    pad = bytes(max(0, size - 8))
    errors = 0
    started = time.monotonic()
    for i in range(count):
        try:
            sock.sendto(struct.pack("!Q", i) + pad, to)
        except OSError:  # e.g. EPERM/EAGAIN while no SA exists: the datagram is lost
            errors += 1
        delay = started + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return {"sent": count, "send_errors": errors,
            "seconds": round(time.monotonic() - started, 3)}


def receive(bind: tuple[str, int], idle_s: float, wait_s: float = 600.0,
            ready: bool = True) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET6 if ":" in bind[0] else socket.AF_INET,
                         socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(bind)
    # Idle counts from the first datagram: a sender may take far longer than idle_s to
    # start (an interpreter under the kernel tests' emulated VM takes tens of seconds).
    sock.settimeout(wait_s)
    if ready:
        print("ready", flush=True)
    seen: set[int] = set()
    received = duplicates = reordered = 0
    highest = -1
    first = last = None
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends it like idle
    try:
        while True:
            data = sock.recv(65535)
            now = time.monotonic()
            if first is None:
                first = now
                sock.settimeout(idle_s)
            last = now
            seq = struct.unpack_from("!Q", data)[0]
            received += 1
            if seq in seen:
                duplicates += 1
                continue
            seen.add(seq)
            if seq < highest:
                reordered += 1
            highest = max(highest, seq)
    except (TimeoutError, KeyboardInterrupt):
        pass
    missing = sorted(set(range(highest + 1)) - seen)
    longest = run = 0
    for i, seq in enumerate(missing):
        run = run + 1 if i and seq == missing[i - 1] + 1 else 1
        longest = max(longest, run)
    return {"received": received, "distinct": len(seen), "duplicates": duplicates,
            "lost": len(missing), "reordered": reordered, "highest": highest,
            "longest_loss_run": longest,
            "seconds": round(last - first, 3) if first is not None and last is not None else 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apps.udpstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send", help="send a numbered stream")
    s.add_argument("--to", type=_addr, required=True, help="HOST:PORT of the receiver")
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--rate", type=float, default=500.0, help="datagrams per second")
    s.add_argument("--size", type=int, default=200, help="datagram size in bytes (>= 8)")
    r = sub.add_parser("receive", help="count a numbered stream; print JSON when idle")
    r.add_argument("--bind", type=_addr, required=True, help="HOST:PORT to listen on")
    r.add_argument("--idle", type=float, default=3.0,
                   help="seconds of silence after the first datagram that end it")
    r.add_argument("--wait", type=float, default=600.0,
                   help="seconds to wait for the first datagram")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.cmd == "send":
        result = send(args.to, args.count, args.rate, args.size)
    else:
        result = receive(args.bind, args.idle, args.wait)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
