"""Sliding anti-replay window (RFC 6479 style: a bitmap behind the highest sequence seen)."""

from __future__ import annotations

WINDOW = 4096


class ReplayWindow:
    """Accepts each sequence number once, and none older than `size` behind the newest.

    `check` is called before decryption (cheap rejection), `update` only after the
    packet authenticated, so forged packets cannot move the window.
    """

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self._mask = (1 << size) - 1
        self.top = 0          # highest accepted sequence number (0: none yet)
        self.bits = 0         # bit i set: top - i was accepted

    def check(self, seq: int) -> bool:
        if seq <= 0:
            return False
        if seq > self.top:
            return True
        behind = self.top - seq
        return behind < self.size and not (self.bits >> behind) & 1

    def update(self, seq: int) -> None:
        if seq > self.top:
            shift = seq - self.top
            self.bits = ((self.bits << shift) | 1) & self._mask if shift < self.size else 1
            self.top = seq
        else:
            self.bits |= 1 << (self.top - seq)
