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
from gateways.scada.frame import (
    HEADER,
    HEADER_LEN,
    OVERHEAD,
    TYPE_DATA,
    VERSION,
    Header,
)
from keyclient.installer import SessionKey

Buffer = bytes | bytearray | memoryview

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
                epoch, str(key.source), AESGCM(tx[:32]), tx[32:], AESGCM(rx[:32]), rx[32:])

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

    def seal(self, packet: Buffer, kind: int = TYPE_DATA) -> bytes | None:
        """The frame carrying `packet`, or None (dropped and counted) without a key."""
        out = bytearray(len(packet) + OVERHEAD)
        n = self.seal_into(packet, memoryview(out), kind)
        return None if n is None else bytes(out)

    def seal_into(self, packet: Buffer, out: memoryview, kind: int = TYPE_DATA) -> int | None:
        """Write the frame carrying `packet` at the start of `out` (room for
        len(packet) + OVERHEAD bytes); its length, or None (dropped, counted) without a key.

        The data path's form: no frame-sized allocation or copy per packet.
        """
        tx = self._tx
        if tx is None:
            self.drops[Drop.NO_KEY] += 1
            return None
        seq = next(tx.seq)
        if seq >= SEQ_LIMIT:
            self.drops[Drop.SEQ_EXHAUSTED] += 1
            return None
        HEADER.pack_into(out, 0, VERSION, kind, self.pair, tx.epoch, seq)
        end = len(packet) + OVERHEAD
        tx.tx.encrypt_into(tx.tx_salt + seq.to_bytes(8, "big"), packet, out[:HEADER_LEN],
                           out[HEADER_LEN:end])
        return end

    def open(self, header: Header, frame: Buffer) -> bytes | None:
        """The packet inside an authentic, fresh frame; None (counted) otherwise."""
        out = bytearray(max(len(frame) - OVERHEAD, 0))
        n = self.open_into(header.epoch, header.seq, memoryview(frame), memoryview(out))
        return None if n is None else bytes(out)

    def open_into(self, epoch: int, seq: int, frame: memoryview, out: memoryview) -> int | None:
        """Authenticate `frame` (whose header names `epoch` and `seq`) and write its
        packet at the start of `out`; the packet's length, or None (dropped and counted).

        The replay window moves only after the tag checked out, so a forgery cannot
        advance it and make genuine packets look old.
        """
        ep = self._epochs.get(epoch)
        if ep is None:
            self.drops[Drop.UNKNOWN_EPOCH] += 1
            return None
        window = ep.window
        if not window.check(seq):
            self.drops[Drop.REPLAYED] += 1
            return None
        size = len(frame) - OVERHEAD
        if size < 0:
            self.drops[Drop.TRUNCATED] += 1
            return None
        try:
            ep.rx.decrypt_into(ep.rx_salt + frame[8:HEADER_LEN], frame[HEADER_LEN:],
                               frame[:HEADER_LEN], out[:size])
        except InvalidTag:
            self.drops[Drop.AUTH_FAILED] += 1
            return None
        window.update(seq)
        return size
