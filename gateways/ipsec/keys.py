"""Kernel ESP SAs from session keys: the `KeyInstaller` a KeySession drives.

Each epoch gives two SAs, one per direction ("a>b" is master to slave). Both
gateways compute the same SPIs from (reqid, epoch, direction), so the rekey
message only has to carry the epoch and key ID:

    spi = reqid << 16 | (2 * epoch + (direction == "b>a")) mod 2^16

which also makes SPIs readable in `ip xfrm state` (0x51d0002a: reqid 0x51d0).
Each SA's 36 bytes (AES-256 key and 4-byte salt for rfc4106(gcm(aes))) come
from HKDF over the epoch's key with a label naming reqid, SPI and direction:
no key serves two directions or two SAs.

Make-before-break with the kernel: `install` adds the epoch's inbound SA
(found by SPI, so the old and new inbound SAs coexist); `activate` adds the
outbound SA and only then deletes the previous outbound one; `retire`
deletes an old inbound SA after the overlap. `invalidate` deletes every SA
but leaves the policies: with `level required` and no SA, the kernel drops
the traffic (fail closed), never sends it in clear.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from gateways.ipsec.xfrm import EspSa, Lifetime, Xfrm, XfrmError
from keyclient.installer import SessionKey

log = logging.getLogger("qgw.gateway.ipsec")

KEY_BYTES = 36  # AES-256 key + 32-bit salt (RFC 4106)


def spi_for(reqid: int, epoch: int, direction: str) -> int:
    if direction not in ("a>b", "b>a"):
        raise ValueError(f"direction must be 'a>b' or 'b>a', not {direction!r}")
    return (reqid << 16) | ((2 * epoch + (direction == "b>a")) & 0xFFFF)


def sa_key(key: SessionKey, reqid: int, direction: str) -> bytes:
    """The 36-byte ESP key of one direction of `key`'s epoch, bound to its SPI."""
    spi = spi_for(reqid, key.epoch, direction)
    return key.derive(f"esp/reqid={reqid}/spi={spi:#010x}/{direction}", KEY_BYTES).expose()


@dataclass(frozen=True)
class Endpoints:
    role: str            # "master" (site A) or "slave" (site B)
    local: str
    peer: str
    reqid: int
    replay_window: int
    lifetime: Lifetime

    @property
    def out_direction(self) -> str:
        return "a>b" if self.role == "master" else "b>a"

    @property
    def in_direction(self) -> str:
        return "b>a" if self.role == "master" else "a>b"


@dataclass
class EpochSas:
    epoch: int
    source: str
    inbound_spi: int
    outbound: EspSa | None           # added to the kernel on activate, then dropped here
    outbound_spi: int
    installed_at: float = field(default_factory=time.monotonic)


class EspKeys:
    """The SAs of one gateway pair at one end, in the kernel."""

    def __init__(self, xfrm: Xfrm, ends: Endpoints) -> None:
        self.xfrm = xfrm
        self.ends = ends
        self._lock = threading.Lock()  # installer calls and expire events come from two threads
        self._epochs: dict[int, EpochSas] = {}
        self._active: EpochSas | None = None
        self.closed_reason: str | None = "no key yet"
        self.rekeys = 0
        self.errors = 0
        self.activated_at: dict[int, float] = {}   # epoch -> monotonic time (rekey latency)

    def _sa(self, key: SessionKey, direction: str) -> EspSa:
        e = self.ends
        src, dst = (e.local, e.peer) if direction == e.out_direction else (e.peer, e.local)
        return EspSa(src=src, dst=dst, spi=spi_for(e.reqid, key.epoch, direction),
                     reqid=e.reqid, key=sa_key(key, e.reqid, direction),
                     replay_window=e.replay_window, lifetime=e.lifetime)

    # -- KeyInstaller --------------------------------------------------------------

    def install(self, epoch: int, key: SessionKey) -> None:
        inbound = self._sa(key, self.ends.in_direction)
        outbound = self._sa(key, self.ends.out_direction)
        with self._lock:
            self._add(inbound)
            self._epochs[epoch] = EpochSas(epoch, key.source.value, inbound.spi, outbound,
                                           outbound.spi)

    def activate(self, epoch: int) -> None:
        with self._lock:
            ep = self._epochs.get(epoch)
            if ep is None or ep.outbound is None:
                log.error("activate of epoch %d that was never installed", epoch)
                return
            self._add(ep.outbound)
            ep.outbound = None
            previous, self._active = self._active, ep
            if previous is not None and previous is not ep:
                self._delete(self.ends.peer, previous.outbound_spi)
            self.rekeys += 1
            self.closed_reason = None
            self.activated_at[epoch] = time.monotonic()
            for old in [e for e in self.activated_at if e < epoch - 64]:
                del self.activated_at[old]

    def retire(self, epoch: int) -> None:
        with self._lock:
            ep = self._epochs.pop(epoch, None)
            if ep is None:
                return
            self._delete(self.ends.local, ep.inbound_spi)
            if ep is self._active:
                self._delete(self.ends.peer, ep.outbound_spi)
                self._active = None
                self.closed_reason = "the active key was retired"

    def invalidate(self, reason: str) -> None:
        with self._lock:
            for ep in self._epochs.values():
                self._delete(self.ends.local, ep.inbound_spi)
                if ep is self._active:
                    self._delete(self.ends.peer, ep.outbound_spi)
            self._epochs.clear()
            self._active = None
            self.closed_reason = reason
        log.warning("IPsec pair fails closed (no SA: the kernel drops its traffic): %s", reason)

    # -- kernel events and status ------------------------------------------------------

    def expired(self, spi: int) -> None:
        """The kernel deleted an SA at its hard lifetime: forget it."""
        with self._lock:
            if self._active is not None and self._active.outbound_spi == spi:
                self._active = None
                self.closed_reason = "the kernel's hard lifetime expired the outbound SA"
            for epoch, ep in list(self._epochs.items()):
                if ep.inbound_spi == spi:
                    del self._epochs[epoch]

    @property
    def active_epoch(self) -> int | None:
        active = self._active
        return None if active is None else active.epoch

    @property
    def source(self) -> str | None:
        active = self._active
        return None if active is None else active.source

    @property
    def epochs(self) -> list[int]:
        return sorted(self._epochs)

    def spis(self) -> dict[str, int | None]:
        active = self._active
        return {"out": None if active is None else active.outbound_spi,
                "in": None if active is None else active.inbound_spi}

    def _add(self, sa: EspSa) -> None:
        try:
            self.xfrm.add_sa(sa)
        except XfrmError:
            self.errors += 1
            raise

    def _delete(self, dst: str, spi: int) -> None:
        try:
            self.xfrm.delete_sa(dst, spi)
        except XfrmError as exc:
            self.errors += 1
            log.error("could not delete SA spi %#010x: %s", spi, exc)
