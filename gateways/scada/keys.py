"""One gateway pair's keys in the data plane: the `KeyInstaller` a KeySession drives.

Each epoch's session key gives two AES-256-GCM keys with 4-byte nonce salts,
one per direction (HKDF labels `scada/pair=N/cc>sub` and `.../sub>cc`), so no
key protects two directions. The nonce is salt || sequence number; the
sequence restarts at 1 for each new key and is never reused under one key.

Make-before-break: `install` makes an epoch acceptable inbound, `activate`
switches outbound to it, `retire` forgets it after the overlap. Packets name
their epoch, so during an overlap both keys are accepted and none is lost.
`invalidate` drops every key: the pair then drops traffic (fails closed)
until the next `activate`; nothing is ever sent in clear.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateways.replay import ReplayWindow
from gateways.scada.frame import HEADER_LEN, TYPE_DATA, TYPE_KEEPALIVE, Header, prefix
from keyclient.installer import SessionKey

log = logging.getLogger("qgw.gateway.scada")

SEQ_LIMIT = 2**64 - 1


class Side(StrEnum):
    CONTROL_CENTRE = "control-centre"
    SUBSTATION = "substation"


class Drop(StrEnum):
    """Why a packet was dropped (counter names)."""

    NO_KEY = "no_key"                # nothing to protect it with: fail closed
    UNKNOWN_EPOCH = "unknown_epoch"  # a key this gateway does not hold (any more)
    REPLAYED = "replayed"            # sequence number seen, or too old for the window
    AUTH_FAILED = "auth_failed"      # tampered, or not from the peer
    TRUNCATED = "truncated"          # too short or not a frame of this tunnel
    UNKNOWN_PAIR = "unknown_pair"
    NO_ROUTE = "no_route"            # no substation behind the destination
    POLICY = "policy"                # refused by the Modbus policy
    SEQ_EXHAUSTED = "seq_exhausted"


@dataclass
class _Epoch:
    epoch: int
    source: str
    tx: AESGCM
    tx_salt: bytes
    rx: AESGCM
    rx_salt: bytes
    prefixes: dict[int, bytes]     # frame type -> first 8 header bytes
    window: ReplayWindow = field(default_factory=ReplayWindow)
    seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


class PairKeys:
    """Keys of one control-centre <-> substation pair, at one end."""

    def __init__(self, pair: int, side: Side, drops: Counter[str] | None = None) -> None:
        self.pair = pair
        self.side = side
        self.drops: Counter[str] = drops if drops is not None else Counter()
        self._epochs: dict[int, _Epoch] = {}
        self._tx: _Epoch | None = None
        self._lock = threading.Lock()  # installer calls come from the session's thread
        self.closed_reason: str | None = "no key yet"
        self.rekeys = 0

    # -- KeyInstaller --------------------------------------------------------------

    def install(self, epoch: int, key: SessionKey) -> None:
        out, inn = ("cc>sub", "sub>cc") if self.side is Side.CONTROL_CENTRE else \
            ("sub>cc", "cc>sub")
        tx = key.derive(f"scada/pair={self.pair}/{out}", 36).expose()
        rx = key.derive(f"scada/pair={self.pair}/{inn}", 36).expose()
        with self._lock:
            self._epochs[epoch] = _Epoch(
                epoch, str(key.source), AESGCM(tx[:32]), tx[32:], AESGCM(rx[:32]), rx[32:],
                {kind: prefix(self.pair, epoch, kind) for kind in (TYPE_DATA, TYPE_KEEPALIVE)})

    def activate(self, epoch: int) -> None:
        with self._lock:
            ep = self._epochs.get(epoch)
            if ep is None:
                log.error("pair %d: activate of epoch %d that was never installed",
                          self.pair, epoch)
                return
            self._tx = ep
            self.rekeys += 1
            self.closed_reason = None

    def retire(self, epoch: int) -> None:
        with self._lock:
            ep = self._epochs.pop(epoch, None)
            if ep is not None and ep is self._tx:
                self._tx = None
                self.closed_reason = "the active key was retired"

    def invalidate(self, reason: str) -> None:
        with self._lock:
            self._epochs.clear()
            self._tx = None
            self.closed_reason = reason
        log.warning("pair %d fails closed: %s", self.pair, reason)

    # -- data plane ----------------------------------------------------------------

    @property
    def active_epoch(self) -> int | None:
        tx = self._tx
        return None if tx is None else tx.epoch

    @property
    def source(self) -> str | None:
        tx = self._tx
        return None if tx is None else tx.source

    @property
    def epochs(self) -> list[int]:
        return sorted(self._epochs)

    def seal(self, packet: bytes, kind: int = TYPE_DATA) -> bytes | None:
        """The frame carrying `packet`, or None (dropped and counted) without a key."""
        tx = self._tx
        if tx is None:
            self.drops[Drop.NO_KEY] += 1
            return None
        seq = next(tx.seq)
        if seq >= SEQ_LIMIT:
            self.drops[Drop.SEQ_EXHAUSTED] += 1
            return None
        counter = seq.to_bytes(8, "big")
        header = tx.prefixes[kind] + counter
        return header + tx.tx.encrypt(tx.tx_salt + counter, packet, header)

    def open(self, header: Header, frame: bytes) -> bytes | None:
        """The packet inside an authentic, fresh frame; None (counted) otherwise."""
        ep = self._epochs.get(header.epoch)
        if ep is None:
            self.drops[Drop.UNKNOWN_EPOCH] += 1
            return None
        if not ep.window.check(header.seq):
            self.drops[Drop.REPLAYED] += 1
            return None
        try:
            packet = ep.rx.decrypt(ep.rx_salt + frame[8:HEADER_LEN], frame[HEADER_LEN:],
                                   frame[:HEADER_LEN])
        except InvalidTag:
            self.drops[Drop.AUTH_FAILED] += 1
            return None
        ep.window.update(header.seq)
        return packet
