"""Per-link, per-packet masks of ordered proof of transit.

Ordered PoT (draft-ietf-sfc-proof-of-transit, section "Ordered POT (OPOT)"; Aguado et al.,
JOCN 12(4), 2020) gives each pair of adjacent nodes a shared mask: a node unmasks the
cumulative value CML with the mask it shares with its upstream neighbour, adds its share
and masks the result with the one it shares with its downstream neighbour. Here a link's
mask key comes from that link's QKD key (the KeySession of the two nodes), one key per
direction and purpose:

    mask key  = SessionKey.derive("opot/mask|path=<path>|<upstream>><downstream>", 32)
    mask(seq) = the 64-bit big-endian word number `seq` of the AES-256-CTR keystream
                under the mask key, counter block starting at 0
                (= bytes 8*seq .. 8*seq+7 of AES-CTR(key, 0^128) applied to zeros)

so one QKD key gives a fresh 64-bit mask for every packet (sequence numbers are never
repeated on a path), never one QKD key per packet. The keystream is computed 256 masks
(2 KiB) at a time and the last few batches are cached, so a packet costs a slice,
not a cipher setup.

Rekeying is make-before-break through the `KeyInstaller` contract: `install(epoch, key)`
makes a key usable for unmasking, `activate(epoch)` masks outgoing packets with it,
`retire(epoch)` forgets it (installing epoch N+2 also supersedes a not yet retired,
inactive N). A packet carries the key phase (epoch & 1) of the link it is
on, so during an overlap the receiver picks the right one of the two keys; a node
rewrites the phase for its downstream link.
"""

from __future__ import annotations

import struct
import threading

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateways.opot.errors import NotKeyed
from keyclient.installer import SessionKey
from qgw.secret import Secret

_SHIFT = 8
BATCH = 1 << _SHIFT           # masks per keystream batch
_BATCH_BYTES = BATCH * 8      # 2 KiB = 128 AES blocks
_BLOCKS_PER_BATCH = _BATCH_BYTES // 16
_CACHED = 4                   # batches kept (packets reorder a little)
_ZEROS = bytes(_BATCH_BYTES)
_WORDS = struct.Struct(f"!{BATCH}Q")
KEY_LEN = 32


class MaskKey:
    """One link's masks under one key epoch. `mask(seq)` is cheap and deterministic."""

    __slots__ = ("_cache", "_key")

    def __init__(self, key: Secret) -> None:
        if len(key) != KEY_LEN:
            raise ValueError(f"a mask key is {KEY_LEN} bytes")
        self._key = key
        self._cache: dict[int, tuple[int, ...]] = {}

    def mask(self, seq: int) -> int:
        words = self._cache.get(seq >> _SHIFT)
        if words is None:
            words = self._expand(seq >> _SHIFT)
        return words[seq & (BATCH - 1)]

    def _expand(self, batch: int) -> tuple[int, ...]:
        counter = (batch * _BLOCKS_PER_BATCH).to_bytes(16, "big")
        try:
            key = self._key.expose()
        except ValueError:
            # Retired by the session's thread while this packet was on its way: the packet
            # is dropped as unkeyed, the packet loop goes on.
            raise NotKeyed("the link's mask key was retired") from None
        enc = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        words = _WORDS.unpack(enc.update(_ZEROS))
        if len(self._cache) >= _CACHED:
            del self._cache[next(iter(self._cache))]
        self._cache[batch] = words
        return words

    def wipe(self) -> None:
        self._key.wipe()
        self._cache.clear()

    def __repr__(self) -> str:
        return "<MaskKey SECRET>"

    def __reduce__(self) -> str:
        raise TypeError("MaskKey cannot be pickled")


class LinkKeys:
    """The mask keys of one link (upstream -> downstream) at one of its two ends.

    Implements `keyclient.installer.KeyInstaller`, so a KeySession between the two
    nodes drives it. At most two epochs are held, one per key phase (epoch & 1).
    """

    def __init__(self, path: str, upstream: str, downstream: str) -> None:
        self.path = path
        self.upstream = upstream
        self.downstream = downstream
        self.label = f"opot/mask|path={path}|{upstream}>{downstream}"
        self._keys: list[tuple[int, MaskKey] | None] = [None, None]
        self._active: tuple[int, MaskKey] | None = None
        self._lock = threading.Lock()   # installer calls come from the session's thread
        self.closed_reason: str | None = "no key yet"

    def __repr__(self) -> str:
        return f"LinkKeys({self.label!r}, epochs={self.epochs})"

    # -- KeyInstaller ----------------------------------------------------------------

    def install(self, epoch: int, key: SessionKey) -> None:
        phase = epoch & 1
        with self._lock:
            held = self._keys[phase]
            if held is not None and held[0] == epoch:
                return
            if held is not None and (held[0] > epoch or held is self._active):
                raise ValueError(f"{self.label}: epoch {held[0]} holds key phase {phase}; "
                                 f"cannot install epoch {epoch} over it")
            if held is not None:      # two epochs old and not retired yet: superseded
                held[1].wipe()
            self._keys[phase] = (epoch, MaskKey(key.derive(self.label, KEY_LEN)))

    def activate(self, epoch: int) -> None:
        with self._lock:
            held = self._keys[epoch & 1]
            if held is None or held[0] != epoch:
                raise ValueError(f"{self.label}: epoch {epoch} is not installed")
            self._active = held
            self.closed_reason = None

    def retire(self, epoch: int) -> None:
        with self._lock:
            held = self._keys[epoch & 1]
            if held is None or held[0] != epoch:
                return
            self._keys[epoch & 1] = None
            if self._active is held:
                self._active = None
                self.closed_reason = f"epoch {epoch} retired"
            held[1].wipe()

    def invalidate(self, reason: str) -> None:
        with self._lock:
            for held in self._keys:
                if held is not None:
                    held[1].wipe()
            self._keys = [None, None]
            self._active = None
            self.closed_reason = reason

    # -- data plane --------------------------------------------------------------------

    @property
    def epochs(self) -> list[int]:
        return sorted(h[0] for h in self._keys if h is not None)

    @property
    def active_epoch(self) -> int | None:
        active = self._active
        return None if active is None else active[0]

    def sending(self) -> tuple[int, MaskKey]:
        """(key phase, key) to mask outgoing packets with; NotKeyed if none is active."""
        active = self._active
        if active is None:
            raise NotKeyed(f"{self.label}: no active mask key ({self.closed_reason})")
        return active[0] & 1, active[1]

    def receiving(self, phase: int) -> MaskKey | None:
        """The key of `phase` to unmask an incoming packet with, if held."""
        held = self._keys[phase & 1]
        return None if held is None else held[1]
