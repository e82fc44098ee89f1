"""Free TCP ports for local networks (the demo, tests), chosen where nothing else will take them.

A port from bind(0) comes from the kernel's ephemeral range, where any outgoing
connection may take it before the KME that was meant to have it binds it.
These come from below that range, at random, and are checked by binding.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def _window() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low - 10000 >= 1000:
        return 10000, low
    return high + 1, 65536


def _free(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """`count` consecutive ports, free now and not handed out before by this process."""
    start, stop = _window()
    rng = random.Random()  # noqa: S311 (spreading ports, not a secret)
    for _ in range(500):
        base = rng.randrange(start, stop - count)
        block = list(range(base, base + count))
        if any(p in _handed_out for p in block):
            continue
        if all(_free(p, host) for p in block):
            _handed_out.update(block)
            return block
    raise OSError(f"no {count} consecutive free ports in {start}-{stop}")
