"""What each role of a KeySession does: the master offers keys, the slave takes them.

Both drop their prefetched pools whenever the peer reconnects: the peer may
have restarted, and a key the other side no longer holds is worthless. Epochs
only grow: after a reconnect the master continues from the highest epoch
either side has seen, so a data plane never sees an epoch number twice.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keyclient.errors import KMEBadRequest, KMEError, KMEUnauthorized, PeerError
from keyclient.etsi014 import Key
from keyclient.installer import SessionKey
from keyclient.kdf import session_key
from keyclient.policy import KeySource, SupplyMode
from keyclient.pqc import KemKeyPair, encapsulate

if TYPE_CHECKING:
    from keyclient.control import Message
    from keyclient.session import KeySession

log = logging.getLogger("qgw.keyclient.session")

ALLOWED_SOURCES = {
    SupplyMode.QKD: {KeySource.QKD},
    SupplyMode.HYBRID: {KeySource.HYBRID},
    SupplyMode.QKD_OR_PQC: {KeySource.QKD, KeySource.PQC},
}
MAX_IDS_PER_CALL = 128


def _session_id(master_nonce: str, slave_nonce: str) -> bytes:
    return hashlib.sha256(bytes.fromhex(master_nonce) + bytes.fromhex(slave_nonce)).digest()


def _nonce(value: object) -> str:
    if not isinstance(value, str) or len(value) != 32:
        raise ValueError("nonce must be 32 hex digits")
    bytes.fromhex(value)
    return value


@dataclass
class _Announced:
    key: Key
    fetch_started: float
    sent_at: float | None


@dataclass
class _Offer:
    key: SessionKey
    sent_at: float
    deadline: float


class MasterAgreement:
    def __init__(self, session: KeySession) -> None:
        self.s = session
        self.nonce = os.urandom(16).hex()
        self.peer_nonce: str | None = None
        self.peer_kem_pk: bytes | None = None
        self.epoch = 0
        self.offer: _Offer | None = None
        self.last_offer: SessionKey | None = None
        self.agreed: deque[Key] = deque()
        self.announced: dict[str, _Announced] = {}
        self.next_refill = 0.0
        self.refill_backoff = session.policy.retry_s
        self.next_try = 0.0
        self.pqc_fallback = False
        self.qkd_paused_until: float | None = None   # the slave cannot reach its KME

    # -- messages ------------------------------------------------------------------

    def on_link(self, up: bool) -> None:
        if up:
            self.s.send({"type": "hello", "role": "master", "nonce": self.nonce,
                         "mode": self.s.policy.mode.value})
        else:
            self.peer_nonce = None
            self._drop_pools()

    def on_hello(self, msg: Message) -> None:
        if msg.get("role") != "slave":
            raise ValueError("the peer of a master must be a slave")
        if msg.get("mode") != self.s.policy.mode.value:
            self.s.note(last_error=f"supply mode mismatch: peer uses {msg.get('mode')!r}, "
                                   f"this gateway {self.s.policy.mode.value!r}")
            log.error("%s", self.s.status().last_error)
            self.peer_nonce = None
            return
        nonce = _nonce(msg.get("nonce"))
        pk = msg.get("kem_pk")
        self.peer_kem_pk = base64.b64decode(pk) if isinstance(pk, str) else None
        self.peer_nonce = nonce
        self._drop_pools()
        self.offer = None
        peer_epochs = [e for e in (msg.get("active_epoch"), msg.get("last_epoch"))
                       if isinstance(e, int)]
        self.epoch = max([self.epoch, *peer_epochs])
        mine = self.s.active.key.epoch if self.s.active else None
        if msg.get("active_epoch") != mine:
            self.s.rekey_wanted = True
        self.next_refill = 0.0
        self.next_try = 0.0

    def on_prefetched(self, msg: Message) -> None:
        now = self.s.clock()
        for kid in msg.get("ok", []):
            ann = self.announced.pop(str(kid), None)
            if ann is not None:
                self.agreed.append(ann.key)
                self.s.note(last_time_to_key_s=now - ann.fetch_started)
        for kid in msg.get("unknown", []):
            ann = self.announced.pop(str(kid), None)
            if ann is not None:
                ann.key.secret.wipe()
        self.s.note(pool_level=len(self.agreed))

    def on_rekey_ok(self, msg: Message) -> None:
        epoch = int(msg["epoch"])
        if self.offer is not None and self.offer.key.epoch == epoch:
            key, sent_at = self.offer.key, self.offer.sent_at
        elif self.offer is None and self.last_offer is not None and self.last_offer.epoch == epoch:
            key, sent_at = self.last_offer, None  # a late answer to an offer that timed out
        else:
            return
        now = self.s.clock()
        self.offer = None
        self.s.activate(key, now)
        if sent_at is not None:
            self.s.note(last_rekey_s=now - sent_at)
        self.s.send({"type": "commit", "epoch": epoch})
        self.s.retire_older_than(epoch, now + self.s.policy.overlap_s)

    def on_rekey_fail(self, msg: Message) -> None:
        epoch = int(msg["epoch"])
        if self.offer is None or self.offer.key.epoch != epoch:
            return
        now = self.s.clock()
        self.offer = None
        self.s.retire_now(epoch)
        reason = str(msg.get("reason", "unspecified"))
        self.s.note(rekey_failures=self.s.status().rekey_failures + 1)
        if reason == "kme-unavailable" and self.s.policy.mode is SupplyMode.QKD_OR_PQC:
            # Only the slave's side of the KME network is down: QKD keys are unusable for
            # this pair however many this side gets, which is what the fallback is for.
            # Rekey with ML-KEM now; offer QKD again after a pause.
            self.qkd_paused_until = now + min(4 * (self.s.policy.rekey_interval_s or 15.0),
                                              60.0)
            self.next_try = now
            log.warning("peer %s cannot reach its KME; falling back to ML-KEM-768",
                        self.s.peer_sae)
            return
        self.next_try = now if reason == "unknown-key" else now + self.s.policy.retry_s
        self.s.supply_failed(now, f"peer {self.s.peer_sae} refused epoch {epoch}: {reason}")

    def on_rekey_request(self, msg: Message) -> None:
        self.s.rekey_wanted = True

    # -- timers --------------------------------------------------------------------

    def deadlines(self) -> list[float]:
        out = []
        if self.offer is not None:
            out.append(self.offer.deadline)
        if self.s.rekey_due(self.s.clock()):
            out.append(self.next_try)
        pol = self.s.policy
        if self.peer_nonce is not None and pol.pool_target:
            # Wake for a refill only when one is wanted, and for announcements the
            # slave has not confirmed: a full pool must not spin the session's thread.
            level = len(self.agreed) + len(self.announced)
            if level <= pol.pool_low and level < pol.pool_target:
                out.append(self.next_refill)
            out.extend(self.s.clock() if a.sent_at is None else a.sent_at + pol.ack_timeout_s
                       for a in self.announced.values())
        return out

    def tick(self, now: float) -> None:
        s = self.s
        if self.offer is not None and now >= self.offer.deadline:
            epoch = self.offer.key.epoch
            self.offer = None  # epoch stays installed: the slave may already send under it
            s.note(rekey_failures=s.status().rekey_failures + 1)
            self.next_try = now + s.policy.retry_s
            s.supply_failed(now, f"peer {s.peer_sae} did not confirm epoch {epoch} "
                                 f"within {s.policy.ack_timeout_s:g} s")
        if self.peer_nonce is not None:
            self._refill(now)
        if s.rekey_due(now) and self.offer is None and now >= self.next_try:
            if self.peer_nonce is None:
                # Look again in retry_s, key or no key: a gateway whose peer never came
                # had woken every millisecond for it.
                self.next_try = now + s.policy.retry_s
                if s.active is not None:
                    s.supply_failed(now, f"peer gateway {s.peer_sae} is not connected")
            else:
                self._rekey(now)
        s.check_grace(now)
        s.note(pool_level=len(self.agreed))

    # -- key supply ----------------------------------------------------------------

    def _refill(self, now: float) -> None:
        s, pol = self.s, self.s.policy
        if not pol.pool_target:
            return
        stale = [kid for kid, a in self.announced.items()
                 if a.sent_at is None or now - a.sent_at >= pol.ack_timeout_s]
        if stale and s.send({"type": "prefetch", "key_IDs": stale}):
            for kid in stale:
                self.announced[kid].sent_at = now
        level = len(self.agreed) + len(self.announced)
        if level > pol.pool_low or level >= pol.pool_target or now < self.next_refill:
            return
        wanted = min(pol.pool_target - level, MAX_IDS_PER_CALL)
        assert s.kme is not None
        try:
            keys = s.kme.get_keys(s.peer_sae, wanted, pol.key_size)
        except KMEError as exc:
            self.next_refill = now + self.refill_backoff
            self.refill_backoff = min(self.refill_backoff * 2, 5.0)
            s.note(last_error=f"prefetch failed: {exc.message}")
            return
        self.refill_backoff = pol.retry_s
        s.note(keys_fetched=s.status().keys_fetched + len(keys))
        for k in keys:
            self.announced[k.key_id] = _Announced(k, now, None)
        ids = [k.key_id for k in keys]
        if s.send({"type": "prefetch", "key_IDs": ids}):
            for kid in ids:
                self.announced[kid].sent_at = now

    def _take_qkd(self) -> Key:
        if self.agreed:
            return self.agreed.popleft()
        s = self.s
        assert s.kme is not None
        key = s.kme.get_keys(s.peer_sae, 1, s.policy.key_size)[0]
        s.note(keys_fetched=s.status().keys_fetched + 1)
        return key

    def _rekey(self, now: float) -> None:
        s, pol = self.s, self.s.policy
        qkd: Key | None = None
        source = KeySource.HYBRID if pol.mode is SupplyMode.HYBRID else KeySource.QKD
        no_qkd: str | None = None
        if self.qkd_paused_until is not None and now < self.qkd_paused_until:
            no_qkd = f"peer {s.peer_sae} cannot reach its KME"
        else:
            try:
                qkd = self._take_qkd()
                if self.pqc_fallback:
                    log.warning("QKD keys are back; leaving the ML-KEM fallback")
                    self.pqc_fallback = False
            except KMEError as exc:
                no_qkd = exc.message
        if no_qkd is not None:
            if pol.mode is not SupplyMode.QKD_OR_PQC:
                self.next_try = now + pol.retry_s
                s.supply_failed(now, f"no QKD key: {no_qkd}")
                return
            if not self.pqc_fallback:
                log.warning("no QKD key (%s); falling back to ML-KEM-768", no_qkd)
                self.pqc_fallback = True
                self.next_refill = now + pol.retry_s
            source = KeySource.PQC
        kem_ss, kem_ct = b"", None
        if source in (KeySource.HYBRID, KeySource.PQC):
            if self.peer_kem_pk is None:
                s.supply_failed(now, "peer sent no ML-KEM public key")
                return
            try:
                kem_ss, kem_ct = encapsulate(self.peer_kem_pk)
            except PeerError as exc:
                s.supply_failed(now, str(exc))
                return
        assert self.peer_nonce is not None
        epoch = self.epoch + 1
        ikm = (qkd.secret.expose() if qkd else b"") + kem_ss
        key = SessionKey(epoch, source, qkd.key_id if qkd else None, session_key(
            ikm, session_id=_session_id(self.nonce, self.peer_nonce), master_sae=s.local_sae,
            slave_sae=s.peer_sae, epoch=epoch, source=source.value))
        if qkd is not None:
            qkd.secret.wipe()
        s.install(key)
        msg = {"type": "rekey", "epoch": epoch, "key_ID": key.key_id, "source": source.value,
               "session": [self.nonce, self.peer_nonce], "lifetime_s": pol.key_lifetime_s()}
        if kem_ct is not None:
            msg["kem_ct"] = base64.b64encode(kem_ct).decode()
        if not s.send(msg):
            s.retire_now(epoch)
            self.next_try = now + pol.retry_s
            s.supply_failed(now, f"peer gateway {s.peer_sae} is not connected")
            return
        self.epoch = epoch
        self.offer = _Offer(key, now, now + pol.ack_timeout_s)
        self.last_offer = key

    def _drop_pools(self) -> None:
        for k in self.agreed:
            k.secret.wipe()
        for a in self.announced.values():
            a.key.secret.wipe()
        self.agreed.clear()
        self.announced.clear()

    def wipe(self) -> None:
        self._drop_pools()


class SlaveAgreement:
    def __init__(self, session: KeySession) -> None:
        self.s = session
        self.nonce: str | None = None
        self.kem: KemKeyPair | None = None
        self.pool: OrderedDict[str, Key] = OrderedDict()
        self.last_epoch = 0
        self.expires_at: float | None = None
        self.requested_for: int | None = None

    def on_link(self, up: bool) -> None:
        if not up:
            return
        self.nonce = os.urandom(16).hex()
        self.kem = KemKeyPair() if self.s.policy.mode is not SupplyMode.QKD else None
        self._drop_pool()
        msg: Message = {
            "type": "hello", "role": "slave", "nonce": self.nonce,
            "mode": self.s.policy.mode.value,
            "active_epoch": self.s.active.key.epoch if self.s.active else None,
            "last_epoch": self.last_epoch,
        }
        if self.kem is not None:
            msg["kem_pk"] = base64.b64encode(self.kem.public_bytes).decode()
        self.s.send(msg)

    def on_hello(self, msg: Message) -> None:
        if msg.get("mode") != self.s.policy.mode.value:
            self.s.note(last_error=f"supply mode mismatch: peer uses {msg.get('mode')!r}, "
                                   f"this gateway {self.s.policy.mode.value!r}")
            log.error("%s", self.s.status().last_error)

    def on_prefetch(self, msg: Message) -> None:
        ids = [str(k) for k in msg["key_IDs"]][:MAX_IDS_PER_CALL]
        ok: list[str] = []
        unknown: list[str] = []
        retry: list[str] = []
        self._fetch(ids, ok, unknown, retry)
        self.s.send({"type": "prefetched", "ok": ok, "unknown": unknown, "retry": retry})
        self.s.note(pool_level=len(self.pool))

    def _fetch(self, ids: list[str], ok: list[str], unknown: list[str], retry: list[str]) -> None:
        s = self.s
        assert s.kme is not None
        try:
            keys = s.kme.get_keys_with_ids(s.peer_sae, ids)
        except (KMEBadRequest, KMEUnauthorized):
            if len(ids) == 1:
                unknown.extend(ids)
            else:  # find out which ones, so the good keys are not lost
                for kid in ids:
                    self._fetch([kid], ok, unknown, retry)
            return
        except KMEError as exc:
            s.note(last_error=f"dec_keys failed: {exc.message}")
            retry.extend(ids)
            return
        for k in keys:
            self.pool[k.key_id] = k
            ok.append(k.key_id)
        s.note(keys_fetched=s.status().keys_fetched + len(keys))

    def on_rekey(self, msg: Message) -> None:
        s = self.s
        epoch = int(msg["epoch"])
        now = s.clock()

        def refuse(reason: str) -> None:
            s.note(rekey_failures=s.status().rekey_failures + 1,
                   last_error=f"refused epoch {epoch}: {reason}")
            s.send({"type": "rekey_fail", "epoch": epoch, "reason": reason})

        session = msg["session"]
        if not isinstance(session, list) or len(session) != 2:
            raise ValueError("session must be [master nonce, slave nonce]")
        master_nonce, slave_nonce = _nonce(session[0]), _nonce(session[1])
        if slave_nonce != self.nonce:
            return refuse("stale-session")
        if epoch <= self.last_epoch:
            return refuse("stale-epoch")
        source = KeySource(msg["source"])
        if source not in ALLOWED_SOURCES[s.policy.mode]:
            return refuse("policy")
        qkd: Key | None = None
        if source in (KeySource.QKD, KeySource.HYBRID):
            kid = str(msg["key_ID"])
            qkd = self.pool.pop(kid, None)
            if qkd is None:
                got: list[str] = []
                unknown: list[str] = []
                self._fetch([kid], got, unknown, [])
                qkd = self.pool.pop(kid, None)
                if qkd is None:
                    return refuse("unknown-key" if unknown else "kme-unavailable")
        kem_ss = b""
        if source in (KeySource.HYBRID, KeySource.PQC):
            if self.kem is None:
                return refuse("policy")
            try:
                kem_ss = self.kem.decapsulate(base64.b64decode(msg["kem_ct"]))
            except (PeerError, ValueError):
                return refuse("bad-kem-ciphertext")
        ikm = (qkd.secret.expose() if qkd else b"") + kem_ss
        key = SessionKey(epoch, source, qkd.key_id if qkd else None, session_key(
            ikm, session_id=_session_id(master_nonce, slave_nonce), master_sae=s.peer_sae,
            slave_sae=s.local_sae, epoch=epoch, source=source.value))
        if qkd is not None:
            qkd.secret.wipe()
        s.install(key)  # inbound first: the master may switch as soon as it reads rekey_ok
        self.last_epoch = epoch  # never taken again, confirmed or not
        if not s.send({"type": "rekey_ok", "epoch": epoch}):
            # The master cannot learn that this side has the key, so it never switches
            # to it: keep the confirmed key, and its lifetime, as if no offer had come.
            s.retire_now(epoch)
            s.note(rekey_failures=s.status().rekey_failures + 1,
                   last_error=f"could not confirm epoch {epoch}: master gateway "
                              f"{s.peer_sae} is not connected")
            return
        s.activate(key, now)
        lifetimes = [x for x in (msg.get("lifetime_s"), s.policy.key_lifetime_s())
                     if isinstance(x, int | float)]
        self.expires_at = now + min(lifetimes) if lifetimes else None

    def on_commit(self, msg: Message) -> None:
        epoch = int(msg["epoch"])
        self.s.retire_older_than(epoch, self.s.clock() + self.s.policy.overlap_s)

    def deadlines(self) -> list[float]:
        return [self.expires_at] if self.expires_at is not None and self.s.active else []

    def tick(self, now: float) -> None:
        s = self.s
        if s.active is not None and self.expires_at is not None and now >= self.expires_at:
            s.fail_closed(f"no new key from master gateway {s.peer_sae} within the key lifetime")
        budget = s.policy.rekey_bytes
        if (budget is not None and s.active is not None and s.bytes_protected >= budget
                and self.requested_for != s.active.key.epoch
                and s.send({"type": "rekey_request"})):
            self.requested_for = s.active.key.epoch
        s.note(pool_level=len(self.pool))

    def _drop_pool(self) -> None:
        for k in self.pool.values():
            k.secret.wipe()
        self.pool.clear()

    def wipe(self) -> None:
        self._drop_pool()
