"""KeySession: master and slave agreeing keys through real KMEs, driven by a fake clock.

The sessions run without their driver threads: the test calls `poll()` on both
and moves the clock, so minutes of rekey schedule take milliseconds and every
step is deterministic. KME calls and the KMEs themselves are real.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from keyclient.control import LoopbackChannel
from keyclient.installer import SessionKey
from keyclient.policy import KeySource, SessionPolicy, SupplyMode
from keyclient.session import KeySession, SessionState
from tests.harness import KmePair


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Recorder:
    """A data plane that records what the session asked of it."""

    events: list[tuple[str, Any]] = field(default_factory=list)
    keys: dict[int, SessionKey] = field(default_factory=dict)
    active: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, epoch: int, key: SessionKey) -> None:
        with self.lock:
            assert epoch not in self.keys, f"epoch {epoch} installed twice"
            self.keys[epoch] = key
            self.events.append(("install", epoch))

    def activate(self, epoch: int) -> None:
        assert epoch in self.keys, "activated before installed"
        self.active = epoch
        self.events.append(("activate", epoch))

    def retire(self, epoch: int) -> None:
        assert epoch != self.active, "retired the active key"
        self.keys.pop(epoch)
        self.events.append(("retire", epoch))

    def invalidate(self, reason: str) -> None:
        self.active = None
        self.events.append(("invalidate", reason))

    def kinds(self, kind: str) -> list[Any]:
        return [v for k, v in self.events if k == kind]


@dataclass
class Pair:
    master: KeySession
    slave: KeySession
    mi: Recorder
    si: Recorder
    clock: FakeClock
    mch: LoopbackChannel
    sch: LoopbackChannel

    def run(self, seconds: float, step: float = 0.1) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            for _ in range(3):  # let messages bounce within one instant
                self.master.poll()
                self.slave.poll()
            self.clock.now += step

    def run_until(self, cond: Any, limit_s: float = 60.0, step: float = 0.1) -> None:
        end = self.clock.now + limit_s
        while not cond():
            assert self.clock.now < end, "condition not reached"
            self.run(step, step)

    def same_keys(self) -> list[int]:
        common = sorted(set(self.mi.keys) & set(self.si.keys))
        for e in common:
            assert self.mi.keys[e].secret == self.si.keys[e].secret, f"epoch {e} differs"
            assert self.mi.keys[e].key_id == self.si.keys[e].key_id
        return common


def make_pair(kmes: KmePair, **policy: Any) -> Pair:
    clock = FakeClock()
    pol = SessionPolicy(**({"rekey_interval_s": 10.0, "overlap_s": 1.0, "ack_timeout_s": 2.0,
                            "retry_s": 0.5, "pool_target": 4, "pool_low": 1} | policy))
    mch, sch = LoopbackChannel.pair()
    mi, si = Recorder(), Recorder()
    master = KeySession("master", kme=kmes.client("SAE_1", retries=0), local_sae="SAE_1",
                        peer_sae="SAE_2", channel=mch, installer=mi, policy=pol, clock=clock)
    slave = KeySession("slave", kme=kmes.client("SAE_2", retries=0), local_sae="SAE_2",
                       peer_sae="SAE_1", channel=sch, installer=si, policy=pol, clock=clock)
    slave.start(thread=False)
    master.start(thread=False)
    return Pair(master, slave, mi, si, clock, mch, sch)


@pytest.fixture
def pair(kmes: KmePair) -> Iterator[Pair]:
    p = make_pair(kmes)
    yield p
    p.master.stop()
    p.slave.stop()


def test_rekeys_make_before_break_with_identical_keys(pair: Pair) -> None:
    pair.run(55)  # first key at once, then one every 10 s
    st = pair.master.status()
    assert st.state is SessionState.PROTECTED and st.rekeys == 6 and st.rekey_failures == 0
    assert pair.slave.status().epoch == st.epoch == 6
    for rec in (pair.mi, pair.si):
        assert rec.kinds("install") == [1, 2, 3, 4, 5, 6]
        assert rec.kinds("activate") == [1, 2, 3, 4, 5, 6]
        assert rec.kinds("retire") == [1, 2, 3, 4, 5]
        # make-before-break: N installed before N activated, N-1 retired only after N active
        ev = rec.events
        for n in range(2, 7):
            order = [ev.index(("install", n)), ev.index(("activate", n)),
                     ev.index(("retire", n - 1))]
            assert order == sorted(order)
    assert pair.same_keys() == [6]
    key = pair.mi.keys[6]
    assert key.source is KeySource.QKD and key.key_id is not None and len(key.secret) == 32
    assert "SECRET" in repr(key) and key.secret.expose().hex() not in repr(pair.master.status())


def test_every_epoch_has_a_fresh_key(pair: Pair) -> None:
    seen: list[bytes] = []
    for _ in range(5):
        pair.run(10)
        seen.append(pair.mi.keys[pair.mi.active].secret.expose())  # type: ignore[index]
    assert len(set(seen)) == 5
    # and a derived subkey differs per label and per epoch
    k = pair.mi.keys[pair.mi.active]  # type: ignore[index]
    assert k.derive("esp/a>b") != k.derive("esp/b>a")


def test_pool_prefetch_batches_kme_calls(pair: Pair) -> None:
    pair.run(95)
    st_m, st_s = pair.master.status(), pair.slave.status()
    assert st_m.rekeys == 10
    assert 0 < st_m.pool_level <= 4 and st_s.pool_level == st_m.pool_level
    # 10 keys used, fetched in refills of up to 4: every fetched key was announced to the slave
    assert st_m.keys_fetched == st_s.keys_fetched >= 10
    assert st_m.last_time_to_key_s is not None


def test_byte_budget_triggers_rekey_from_either_side(kmes: KmePair) -> None:
    p = make_pair(kmes, rekey_interval_s=None, rekey_bytes=10_000)
    try:
        p.run(1)
        assert p.master.status().epoch == 1
        p.master.add_bytes(6_000)
        p.run(1)
        assert p.master.status().epoch == 1
        p.master.add_bytes(6_000)
        p.run(1)
        assert p.master.status().epoch == 2
        p.slave.add_bytes(10_001)  # the slave's direction spent its budget: it asks
        p.run(1)
        assert p.master.status().epoch == p.slave.status().epoch == 3
        assert p.same_keys()
    finally:
        p.master.stop()
        p.slave.stop()


def _drain_pool(p: Pair) -> None:
    """Use up the prefetched keys, so the next rekey needs the KME."""
    for _ in range(6):
        p.master.request_rekey()
        p.run(0.5)


def test_kme_outage_fail_closed_then_recovery(kmes: KmePair) -> None:
    p = make_pair(kmes, pool_target=0, pool_low=0, grace_s=0.0)
    try:
        p.run(1)
        assert p.master.status().state is SessionState.PROTECTED
        kmes.stop("KME_A")
        p.run(10.5)
        st = p.master.status()
        assert st.state is SessionState.FAILED_CLOSED
        assert "no QKD key" in (st.last_error or "") and "KME" in (st.last_error or "")
        assert p.mi.active is None and p.mi.kinds("invalidate") and not p.mi.keys
        # the slave keeps what it has until its key lifetime ends, then fails closed too
        p.run(10)
        assert p.slave.status().state is SessionState.FAILED_CLOSED
        assert p.si.kinds("invalidate") and not p.si.keys
        kmes.start("KME_A")
        p.run_until(lambda: p.master.status().state is SessionState.PROTECTED)
        p.run(1)
        assert p.slave.status().state is SessionState.PROTECTED
        assert p.same_keys() == [p.master.status().epoch]
    finally:
        p.master.stop()
        p.slave.stop()


def test_kme_outage_within_grace_keeps_the_key(kmes: KmePair) -> None:
    p = make_pair(kmes, pool_target=0, pool_low=0, grace_s=30.0)
    try:
        p.run(1)
        kmes.stop("KME_A")
        p.run(15)
        st = p.master.status()
        assert st.state is SessionState.GRACE and st.epoch == 1
        assert not p.mi.kinds("invalidate") and p.mi.active == 1
        kmes.start("KME_A")
        p.run(5)
        st = p.master.status()
        assert st.state is SessionState.PROTECTED and st.epoch == 2
        assert not p.mi.kinds("invalidate") and not p.si.kinds("invalidate")
    finally:
        p.master.stop()
        p.slave.stop()


def test_grace_runs_out(kmes: KmePair) -> None:
    p = make_pair(kmes, pool_target=0, pool_low=0, grace_s=5.0)
    try:
        p.run(1)
        kmes.stop("KME_A")
        p.run(12)
        assert p.master.status().state is SessionState.GRACE
        p.run(4)
        assert p.master.status().state is SessionState.FAILED_CLOSED
        assert len(p.mi.kinds("invalidate")) == 1
    finally:
        p.master.stop()
        p.slave.stop()


def test_qkd_or_pqc_falls_back_to_ml_kem_and_returns(kmes: KmePair) -> None:
    p = make_pair(kmes, mode=SupplyMode.QKD_OR_PQC, pool_target=2, pool_low=0)
    try:
        p.run(1)
        assert p.master.status().source is KeySource.QKD
        kmes.stop("KME_A")
        _drain_pool(p)
        p.run(20)
        st = p.master.status()
        assert st.state is SessionState.PROTECTED and st.source is KeySource.PQC
        assert st.key_id is None and p.same_keys()
        assert not p.mi.kinds("invalidate")
        kmes.start("KME_A")
        p.run_until(lambda: p.master.status().source is KeySource.QKD)
        assert p.same_keys()
    finally:
        p.master.stop()
        p.slave.stop()


def test_hybrid_needs_both_sources(kmes: KmePair) -> None:
    p = make_pair(kmes, mode=SupplyMode.HYBRID, pool_target=0, pool_low=0)
    try:
        p.run(25)
        st = p.master.status()
        assert st.source is KeySource.HYBRID and st.key_id is not None and st.epoch == 3
        assert p.same_keys()
        before = {e: k.secret.expose() for e, k in p.mi.keys.items()}
        kmes.stop("KME_A")
        p.run(10)
        assert p.master.status().state is SessionState.FAILED_CLOSED  # no ML-KEM-only key
        kmes.start("KME_A")
        p.run_until(lambda: p.master.status().state is p.slave.status().state
                    is SessionState.PROTECTED)
        p.run(1.5)  # past the overlap
        st = p.master.status()
        assert st.source is KeySource.HYBRID and st.key_id is not None
        assert st.epoch is not None and st.epoch > 3 and p.same_keys() == [st.epoch]
        assert p.mi.keys[st.epoch].source is p.si.keys[st.epoch].source is KeySource.HYBRID
        assert p.mi.keys[st.epoch].secret.expose() not in before.values()
    finally:
        p.master.stop()
        p.slave.stop()


def test_peer_gone_mid_rekey_then_back(kmes: KmePair) -> None:
    p = make_pair(kmes, grace_s=0.0)
    try:
        p.run(1)
        assert p.master.status().epoch == 1
        p.clock.now += 10  # rekey due
        p.master.poll()    # the offer for epoch 2 goes out...
        assert p.master.status().epoch == 1
        p.sch.close()      # ...and the slave dies before answering
        p.slave.stop()
        p.run(3)
        st = p.master.status()
        assert st.state is SessionState.FAILED_CLOSED and st.rekey_failures >= 1
        assert "did not confirm epoch 2" in (st.last_error or "") \
            or "not connected" in (st.last_error or "")
        # a restarted slave rejoins and gets fresh keys at a higher epoch
        si = Recorder()
        slave = KeySession("slave", kme=kmes.client("SAE_2"), local_sae="SAE_2",
                           peer_sae="SAE_1", channel=p.mch.rejoin(), installer=si,
                           policy=p.master.policy, clock=p.clock)
        slave.start(thread=False)
        p.slave, p.si = slave, si
        p.run(2)
        st = p.master.status()
        assert st.state is SessionState.PROTECTED and st.epoch is not None and st.epoch >= 3
        assert p.same_keys() == [st.epoch]
    finally:
        p.master.stop()
        p.slave.stop()


def test_master_restart_continues_epochs(kmes: KmePair) -> None:
    p = make_pair(kmes)
    try:
        p.run(25)
        before = p.slave.status().epoch
        assert before == 3
        p.mch.close()
        p.master.stop()
        mi = Recorder()
        master = KeySession("master", kme=kmes.client("SAE_1"), local_sae="SAE_1",
                            peer_sae="SAE_2", channel=p.sch.rejoin(), installer=mi,
                            policy=p.master.policy, clock=p.clock)
        master.start(thread=False)
        p.master, p.mi = master, mi
        p.run(2)
        assert p.master.status().epoch == p.slave.status().epoch == before + 1
        assert p.same_keys() == [before + 1]
        p.run(3)  # the overlap passes: the slave drops the old master's epochs
        assert set(p.si.keys) == {before + 1}
    finally:
        p.master.stop()
        p.slave.stop()


def test_a_master_whose_peer_never_comes_waits_instead_of_spinning(kmes: KmePair) -> None:
    # No key yet and nobody to agree one with: nothing is due before the next retry, and
    # no QKD key is taken from the KME for a peer that is not there.
    clock = FakeClock()
    mch, _never_started = LoopbackChannel.pair()
    m = KeySession("master", kme=kmes.client("SAE_1"), local_sae="SAE_1", peer_sae="SAE_2",
                   channel=mch, installer=Recorder(), clock=clock,
                   policy=SessionPolicy(retry_s=0.5, pool_target=0, pool_low=0))
    m.start(thread=False)
    try:
        waits = []
        for _ in range(10):
            waits.append(m.poll())
            clock.now += 0.05
        assert min(waits[1:]) >= 0.04 and m.status().keys_fetched == 0
        assert m.status().epoch is None and not m.status().peer_connected
    finally:
        m.stop()


def test_supply_mode_mismatch_is_reported(kmes: KmePair) -> None:
    clock = FakeClock()
    mch, sch = LoopbackChannel.pair()
    m = KeySession("master", kme=kmes.client("SAE_1"), local_sae="SAE_1", peer_sae="SAE_2",
                   channel=mch, installer=Recorder(), clock=clock,
                   policy=SessionPolicy(mode=SupplyMode.QKD))
    s = KeySession("slave", kme=kmes.client("SAE_2"), local_sae="SAE_2", peer_sae="SAE_1",
                   channel=sch, installer=Recorder(), clock=clock,
                   policy=SessionPolicy(mode=SupplyMode.HYBRID))
    s.start(thread=False)
    m.start(thread=False)
    try:
        for _ in range(5):
            m.poll()
            s.poll()
            clock.now += 1
        assert m.status().epoch is None and "mismatch" in (m.status().last_error or "")
        assert "mismatch" in (s.status().last_error or "")
    finally:
        m.stop()
        s.stop()


def test_slave_refuses_replayed_or_stale_offers(pair: Pair) -> None:
    pair.run(1)
    sent: list[dict[str, Any]] = []
    original = pair.sch.send

    def spy(msg: dict[str, Any]) -> None:
        sent.append(msg)
        original(msg)

    pair.sch.send = spy  # type: ignore[method-assign]
    offer = {"type": "rekey", "epoch": 1, "key_ID": "00000000-0000-0000-0000-000000000000",
             "source": "qkd", "session": ["00" * 16, "11" * 16], "lifetime_s": 10}
    pair.mch.send(offer)  # the master's channel delivers to the slave
    pair.slave.poll()
    assert sent[-1] == {"type": "rekey_fail", "epoch": 1, "reason": "stale-session"}
    pair.mch.send(offer | {"type": "rekey", "session": [
        "00" * 16, pair.slave.logic.nonce]})  # type: ignore[attr-defined]
    pair.slave.poll()
    assert sent[-1]["reason"] == "stale-epoch"
    pair.mch.send(offer | {"epoch": 99, "source": "pqc",
                           "session": ["00" * 16, pair.slave.logic.nonce]})  # type: ignore[attr-defined]
    pair.slave.poll()
    assert sent[-1]["reason"] == "policy"
    assert pair.slave.status().epoch == 1


def test_threaded_sessions_rekey_in_real_time(kmes: KmePair) -> None:
    pol = SessionPolicy(rekey_interval_s=0.2, overlap_s=0.1, pool_target=4, pool_low=1)
    mch, sch = LoopbackChannel.pair()
    mi, si = Recorder(), Recorder()
    m = KeySession("master", kme=kmes.client("SAE_1"), local_sae="SAE_1", peer_sae="SAE_2",
                   channel=mch, installer=mi, policy=pol)
    s = KeySession("slave", kme=kmes.client("SAE_2"), local_sae="SAE_2", peer_sae="SAE_1",
                   channel=sch, installer=si, policy=pol)
    s.start()
    m.start()
    try:
        import time
        deadline = time.monotonic() + 20
        while m.status().rekeys < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.status().rekeys >= 5
    finally:
        m.stop()
        s.stop()
    assert m.status().state is SessionState.STOPPED
    common = sorted(set(mi.keys) & set(si.keys))
    assert common and all(mi.keys[e].secret == si.keys[e].secret for e in common)


def test_session_metrics_expose_state_without_secrets(pair: Pair) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from keyclient.metrics import register_session
    pair.run(25)
    registry = CollectorRegistry()
    register_session(pair.master, registry, gateway="test")
    text = generate_latest(registry).decode()
    assert 'qgw_session_epoch{gateway="test",peer_sae="SAE_2",role="master",sae="SAE_1"} 3.0' \
        in text
    assert 'state="protected"} 1.0' in text and 'source="qkd"} 1.0' in text
    assert "qgw_session_rekeys_total" in text
    key = pair.mi.keys[3]
    assert key.key_id is not None and key.key_id not in text
    assert key.secret.expose().hex() not in text
