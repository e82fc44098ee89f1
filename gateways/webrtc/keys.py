"""One participant's SFrame keys: the `KeyInstaller` a KeySession drives.

Each epoch's session key gives two SFrame base keys, one per sending side, so
no key protects two directions:

    kid      = 2 * epoch + (sender is the slave)
    base_key = HKDF(session key, "sframe/kid=<kid>", 32 bytes)

The KID therefore changes with every QKD key, both participants compute the
same KIDs from the epoch alone, and SFrame's per-KID counter (RFC 9605 4.4.3)
restarts under each new key without ever repeating under one.

Make-before-break as in every gateway: `install` makes the epoch's receive
key acceptable, `activate` switches sending to it, `retire` forgets an older
epoch after the overlap. `invalidate` drops every key: `seal` then returns
None (the frame is not sent, never sent in clear) until the next activate.

A browser participant does its SFrame in the page; `subscribe` hands the same
events, with key material, to that local channel only (`handoff`).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from gateways.webrtc.sframe import (
    AuthenticationFailed,
    CipherSuite,
    KeyUsage,
    SFrameContext,
    SFrameError,
    UnknownKey,
)
from keyclient.installer import SessionKey
from qgw.secret import Secret

log = logging.getLogger("qgw.gateway.webrtc")

BASE_KEY_BYTES = 32


class Drop(StrEnum):
    """Why a frame was not sent or not shown (counter names)."""

    NO_KEY = "no_key"              # nothing to send under: fail closed
    UNKNOWN_KEY = "unknown_key"    # a KID this participant does not hold (any more)
    AUTH_FAILED = "auth_failed"    # tampered, or sealed under another key
    MALFORMED = "malformed"        # not an SFrame frame
    EXHAUSTED = "exhausted"        # the counter of the current KID ran out


def kid_for(epoch: int, sender: str) -> int:
    """The KID of `epoch`'s key that `sender` ("master" or "slave") sends under."""
    if sender not in ("master", "slave"):
        raise ValueError(f"sender must be 'master' or 'slave', not {sender!r}")
    return 2 * epoch + (sender == "slave")


def base_key(key: SessionKey, kid: int) -> Secret:
    return key.derive(f"sframe/kid={kid}", BASE_KEY_BYTES)


@dataclass(frozen=True)
class KeyEvent:
    """A change of keys, as the browser handoff channel forwards it."""

    kind: str                   # install | activate | retire | invalidate
    epoch: int | None = None
    send_kid: int | None = None
    recv_kid: int | None = None
    send_key: Secret | None = None
    recv_key: Secret | None = None
    source: str | None = None
    key_id: str | None = None
    reason: str | None = None


Listener = Callable[[KeyEvent], None]


@dataclass
class _Epoch:
    epoch: int
    source: str
    key_id: str | None
    send_kid: int
    recv_kid: int
    send_key: Secret
    recv_key: Secret


class MediaKeys:
    """SFrame keys of one participant of a pair (`role` is its KeySession role)."""

    def __init__(self, role: str,
                 suite: CipherSuite = CipherSuite.AES_256_GCM_SHA512_128) -> None:
        if role not in ("master", "slave"):
            raise ValueError(f"role must be 'master' or 'slave', not {role!r}")
        self.role = role
        self.peer = "slave" if role == "master" else "master"
        self.suite = suite
        self._ctx = SFrameContext(suite)
        self._lock = threading.Lock()   # the session thread installs; codec threads seal/open
        self._epochs: dict[int, _Epoch] = {}
        self._active: _Epoch | None = None
        self._listeners: list[Listener] = []
        # Held while events go out and while a new listener gets the held keys, so a
        # listener sees every change once, in order, and never an older state after it.
        self._events = threading.RLock()
        self.closed_reason: str | None = "no key yet"
        self.rotations = 0
        self.sealed = 0
        self.opened = 0
        self.drops: Counter[Drop] = Counter()

    # -- KeyInstaller ----------------------------------------------------------

    def install(self, epoch: int, key: SessionKey) -> None:
        send_kid, recv_kid = kid_for(epoch, self.role), kid_for(epoch, self.peer)
        ep = _Epoch(epoch, key.source.value, key.key_id, send_kid, recv_kid,
                    base_key(key, send_kid), base_key(key, recv_kid))
        with self._lock:
            # One direction per key (RFC 9605 4.4.1): our own frames echoed back never open.
            self._ctx.add_key(send_kid, ep.send_key.expose(), usage=KeyUsage.ENCRYPT)
            self._ctx.add_key(recv_kid, ep.recv_key.expose(), usage=KeyUsage.DECRYPT)
            self._epochs[epoch] = ep
        self._emit(self._install_event(ep))

    def activate(self, epoch: int) -> None:
        with self._lock:
            ep = self._epochs.get(epoch)
            if ep is None:
                log.error("activate of epoch %d that was never installed", epoch)
                return
            self._active = ep
            self.closed_reason = None
            self.rotations += 1
        log.info("sending under KID %d (epoch %d, %s)", ep.send_kid, epoch, ep.source)
        self._emit(KeyEvent("activate", epoch=epoch, send_kid=ep.send_kid, source=ep.source,
                            key_id=ep.key_id))

    def retire(self, epoch: int) -> None:
        with self._lock:
            ep = self._epochs.pop(epoch, None)
            if ep is None:
                return
            self._ctx.remove_key(ep.send_kid)
            self._ctx.remove_key(ep.recv_kid)
            if ep is self._active:
                self._active = None
                self.closed_reason = "the active key was retired"
        self._emit(KeyEvent("retire", epoch=epoch, send_kid=ep.send_kid, recv_kid=ep.recv_kid))

    def invalidate(self, reason: str) -> None:
        with self._lock:
            for ep in self._epochs.values():
                self._ctx.remove_key(ep.send_kid)
                self._ctx.remove_key(ep.recv_kid)
            self._epochs.clear()
            self._active = None
            self.closed_reason = reason
        log.warning("media keys dropped (frames are not sent until the next key): %s", reason)
        self._emit(KeyEvent("invalidate", reason=reason))

    # -- frames ----------------------------------------------------------------

    def seal(self, frame: bytes, clear: int = 0) -> bytes | None:
        """`frame` as SFrame under the current KID, its first `clear` bytes left readable.

        None when there is no key to send under: the caller drops the frame.
        """
        active = self._active
        if active is None:
            self._count(Drop.NO_KEY)
            return None
        try:   # the context is thread-safe: codec threads do not wait on each other here
            out = self._ctx.protect(active.send_kid, frame, clear)
        except UnknownKey:   # retired between the two lines above
            self._count(Drop.NO_KEY)
            return None
        except SFrameError:
            self._count(Drop.EXHAUSTED)
            return None
        with self._lock:
            self.sealed += 1
        return out

    def open(self, data: bytes, clear: int = 0) -> bytes | None:
        """The plaintext frame, or None (dropped and counted): never a garbled frame."""
        try:
            _, frame = self._ctx.unprotect(data, clear)
        except UnknownKey:
            self._count(Drop.UNKNOWN_KEY)
            return None
        except AuthenticationFailed:
            self._count(Drop.AUTH_FAILED)
            return None
        except SFrameError:
            self._count(Drop.MALFORMED)
            return None
        with self._lock:
            self.opened += 1
        return frame

    def drop_counts(self) -> dict[str, int]:
        """Frames dropped so far, by reason (a copy: codec threads keep counting)."""
        with self._lock:
            return {d.value: self.drops[d] for d in Drop}

    def _count(self, drop: Drop) -> None:
        with self._lock:
            self.drops[drop] += 1

    # -- status and the handoff channel ---------------------------------------------

    @property
    def active_epoch(self) -> int | None:
        active = self._active
        return None if active is None else active.epoch

    @property
    def send_kid(self) -> int | None:
        active = self._active
        return None if active is None else active.send_kid

    @property
    def source(self) -> str | None:
        active = self._active
        return None if active is None else active.source

    @property
    def key_id(self) -> str | None:
        active = self._active
        return None if active is None else active.key_id

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` on every key change, starting with the keys held now."""
        with self._events:
            with self._lock:
                held = [self._install_event(ep) for ep in sorted(self._epochs.values(),
                                                                 key=lambda e: e.epoch)]
                active = self._active
                self._listeners.append(listener)
            for event in held:
                listener(event)
            if active is not None:
                listener(KeyEvent("activate", epoch=active.epoch, send_kid=active.send_kid,
                                  source=active.source, key_id=active.key_id))

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)
        return unsubscribe

    @staticmethod
    def _install_event(ep: _Epoch) -> KeyEvent:
        return KeyEvent("install", epoch=ep.epoch, send_kid=ep.send_kid, recv_kid=ep.recv_kid,
                        send_key=ep.send_key, recv_key=ep.recv_key, source=ep.source,
                        key_id=ep.key_id)

    def _emit(self, event: KeyEvent) -> None:
        with self._events:
            with self._lock:
                listeners = list(self._listeners)
            for listener in listeners:
                try:
                    listener(event)
                except Exception:  # one broken page must not stop the keys
                    log.exception("a key listener failed on %s", event.kind)

