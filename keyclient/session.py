"""KeySession: one gateway of a pair agreeing keys with its peer, epoch after epoch.

Master and slave run the same driver; `keyclient.agreement` holds what each
role does. Messages travel over a `ControlChannel`; the data plane is reached
only through a `KeyInstaller`. All work (KME calls, installer calls, timers)
happens in one driver thread, or in the caller of `poll()` when a test drives
the session with its own clock.

Protocol (JSON messages, see docs/CODEFLOW.md for a walk-through):

    slave  -> master  hello     {nonce, mode, active_epoch, kem_pk?}
    master -> slave   prefetch  {key_IDs}           announce keys fetched with enc_keys
    slave  -> master  prefetched{ok, unknown, retry}  after dec_keys
    master -> slave   rekey     {epoch, key_ID?, source, kem_ct?, session, lifetime_s}
    slave  -> master  rekey_ok  {epoch} | rekey_fail {epoch, reason}
    master -> slave   commit    {epoch}              older epochs may be retired
    slave  -> master  rekey_request {}               the slave's byte budget is spent

Make-before-break: the master installs epoch N inbound before offering it; the
slave installs N, sends rekey_ok and then switches its outbound (the master can
already receive N); the master switches on rekey_ok and commits; both retire
older epochs `overlap_s` later. A slave that cannot send rekey_ok (the master is
gone) drops N and keeps N-1 with its lifetime: the master never switched to N.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from keyclient.control import ChannelDown, ControlChannel, Message
from keyclient.installer import KeyInstaller, SessionKey
from keyclient.policy import KeySource, SessionPolicy
from keyclient.supply import KeySupply

log = logging.getLogger("qgw.keyclient.session")


class Role(StrEnum):
    MASTER = "master"
    SLAVE = "slave"


class SessionState(StrEnum):
    STARTING = "starting"            # no key agreed yet
    PROTECTED = "protected"          # a current key within its budget
    GRACE = "grace"                  # rekey overdue and failing; old key kept within grace_s
    FAILED_CLOSED = "failed-closed"  # no usable key: the gateway drops traffic
    STOPPED = "stopped"


@dataclass(frozen=True)
class SessionStatus:
    role: Role
    state: SessionState
    epoch: int | None = None
    source: KeySource | None = None
    key_id: str | None = None
    pool_level: int = 0
    rekeys: int = 0
    rekey_failures: int = 0
    keys_fetched: int = 0
    supply_failures: int = 0
    peer_connected: bool = False
    last_error: str | None = None
    last_time_to_key_s: float | None = None
    last_rekey_s: float | None = None


@dataclass
class Active:
    key: SessionKey
    since: float
    due: float | None


StatusListener = Callable[[SessionStatus], None]


class KeySession:
    """One side (`role`) of a gateway pair's key agreement."""

    def __init__(self, role: Role | str, *, kme: KeySupply | None, local_sae: str,
                 peer_sae: str, channel: ControlChannel, installer: KeyInstaller,
                 policy: SessionPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_status: StatusListener | None = None) -> None:
        from keyclient.agreement import MasterAgreement, SlaveAgreement

        self.role = Role(role)
        self.kme = kme
        self.local_sae = local_sae
        self.peer_sae = peer_sae
        self.channel = channel
        self.installer = installer
        self.policy = policy or SessionPolicy()
        self.clock = clock
        self._on_status = on_status
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._poll_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._installed: set[int] = set()
        self._retires: list[tuple[float, int]] = []
        self.active: Active | None = None
        self.overdue_since: float | None = None
        self.bytes_protected = 0
        self.rekey_wanted = False
        self._status = SessionStatus(self.role, SessionState.STARTING)
        if self.role is Role.MASTER and kme is None:
            raise ValueError("a master KeySession needs a KME client")
        self.logic = MasterAgreement(self) if self.role is Role.MASTER else SlaveAgreement(self)

    # -- lifecycle ---------------------------------------------------------------

    def start(self, *, thread: bool = True) -> None:
        """Connect the channel; with `thread`, run the driver in the background."""
        self.channel.bind(self._deliver, self._link)
        self.channel.start()
        if thread:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"keysession-{self.local_sae}")
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.channel.close()
        self.logic.wipe()
        self.note(state=SessionState.STOPPED)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                wait = self.poll()
            except Exception:  # the driver must survive a bug in one step
                log.exception("key session step failed")
                wait = self.policy.retry_s
            self._wake.wait(wait)
            self._wake.clear()

    # -- inputs ------------------------------------------------------------------

    def _deliver(self, msg: Message) -> None:
        self._inbox.put(("msg", msg))
        self._wake.set()

    def _link(self, up: bool) -> None:
        self._inbox.put(("link", up))
        self._wake.set()

    def add_bytes(self, n: int) -> None:
        """Tell the session how much traffic the current key protected (byte budget)."""
        self.bytes_protected += n
        budget = self.policy.rekey_bytes
        if budget is not None and self.bytes_protected >= budget:
            self._wake.set()

    def request_rekey(self) -> None:
        self.rekey_wanted = True
        self._wake.set()

    def poll(self) -> float:
        """Handle queued messages and due work once; returns seconds until the next due work."""
        with self._poll_lock:
            while True:
                try:
                    kind, value = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "link":
                    self.note(peer_connected=bool(value))
                    self.logic.on_link(bool(value))
                else:
                    self._handle(value)
            now = self.clock()
            self.logic.tick(now)
            self._run_retires(now)
            return self._next_wait(now)

    def _handle(self, msg: Message) -> None:
        kind = msg.get("type")
        valid = isinstance(kind, str) and kind.isidentifier()
        handler = getattr(self.logic, f"on_{kind}", None) if valid else None
        if handler is None:
            log.warning("ignored control message of unknown type %r", kind)
            return
        try:
            handler(msg)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("malformed %s message from %s: %s", kind, self.peer_sae, exc)

    # -- state shared by both roles -------------------------------------------------

    def status(self) -> SessionStatus:
        return self._status

    def note(self, **changes: Any) -> None:
        """Update the status; listeners hear of real changes only."""
        old = self._status
        new = replace(old, **changes)
        if new == old:
            return
        self._status = new
        if self._on_status is not None:
            self._on_status(new)

    def send(self, msg: Message) -> bool:
        try:
            self.channel.send(msg)
            return True
        except ChannelDown:
            return False

    def rekey_due(self, now: float) -> bool:
        if self.active is None or self.rekey_wanted:
            return True
        budget = self.policy.rekey_bytes
        if budget is not None and self.bytes_protected >= budget:
            return True
        return self.active.due is not None and now >= self.active.due

    def install(self, key: SessionKey) -> None:
        self.installer.install(key.epoch, key)
        self._installed.add(key.epoch)

    def activate(self, key: SessionKey, now: float) -> None:
        was = self._status.state
        self.installer.activate(key.epoch)
        interval = self.policy.rekey_interval_s
        self.active = Active(key, now, now + interval if interval is not None else None)
        self.overdue_since = None
        self.bytes_protected = 0
        self.rekey_wanted = False
        if was in (SessionState.FAILED_CLOSED, SessionState.GRACE):
            log.warning("key session protected again (epoch %d, %s)", key.epoch,
                        key.source.value)
        self.note(state=SessionState.PROTECTED, epoch=key.epoch, source=key.source,
                  key_id=key.key_id, rekeys=self._status.rekeys + 1)

    def retire_older_than(self, epoch: int, at: float) -> None:
        for e in sorted(self._installed):
            if e < epoch and all(r[1] != e for r in self._retires):
                self._retires.append((at, e))

    def retire_now(self, epoch: int) -> None:
        if epoch in self._installed:
            self._installed.discard(epoch)
            self.installer.retire(epoch)

    def _run_retires(self, now: float) -> None:
        due = [r for r in self._retires if r[0] <= now]
        if not due:
            return
        self._retires = [r for r in self._retires if r[0] > now]
        for _, epoch in sorted(due, key=lambda r: r[1]):
            if self.active is None or epoch != self.active.key.epoch:
                self.retire_now(epoch)

    def supply_failed(self, now: float, reason: str) -> None:
        """A key could not be obtained or agreed: go to grace, or fail closed."""
        self.note(supply_failures=self._status.supply_failures + 1, last_error=reason)
        if self.overdue_since is None:
            due = self.active.due if self.active is not None else None
            self.overdue_since = min(now, due) if due is not None else now
        if self.active is not None and now - self.overdue_since < self.policy.grace_s:
            if self._status.state is not SessionState.GRACE:
                log.warning("rekey failed (%s); keeping epoch %d for up to %.1f s", reason,
                            self.active.key.epoch, self.policy.grace_s)
            self.note(state=SessionState.GRACE)
            return
        self.fail_closed(reason)

    def check_grace(self, now: float) -> None:
        if (self._status.state is SessionState.GRACE and self.overdue_since is not None
                and now - self.overdue_since >= self.policy.grace_s):
            self.fail_closed(self._status.last_error or "grace period over")

    def fail_closed(self, reason: str) -> None:
        if self._status.state is SessionState.FAILED_CLOSED:
            return
        log.error("key session failed closed: %s", reason)
        self.installer.invalidate(reason)
        self.active = None
        for epoch in sorted(self._installed):
            self.retire_now(epoch)
        self._retires.clear()
        self.note(state=SessionState.FAILED_CLOSED, epoch=None, source=None, key_id=None,
                  last_error=reason)

    def _next_wait(self, now: float) -> float:
        deadlines = [r[0] for r in self._retires]
        if self.active is not None and self.active.due is not None:
            deadlines.append(self.active.due)
        deadlines.extend(self.logic.deadlines())
        if self.overdue_since is not None:
            deadlines.append(self.overdue_since + self.policy.grace_s)
        wait = min((d - now for d in deadlines), default=1.0)
        return min(max(wait, 0.001), 1.0)
