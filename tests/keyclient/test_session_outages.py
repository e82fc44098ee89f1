"""KeySession when something goes away: the slave's KME, the master mid-rekey, the peer.

(A KME_A outage, and hybrid mode coming back after one, are in test_session.py.)

Driven like test_session.py: both sessions polled by the test on a fake clock, real
KMEs over mutual TLS, the product's LoopbackChannel between the two sessions. The
clock only moves the sessions' schedules; anything that depends on the KMEs (a KME
coming back) is waited for with `Pair.run_until`, a condition with a deadline.

Times below follow the policy of `make_pair`: rekey every 10 s, key lifetime at the
slave = rekey interval + grace + ack timeout (2 s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from keyclient import Etsi014Client
from keyclient.policy import KeySource, SupplyMode
from keyclient.session import KeySession, SessionState
from tests.harness import KmePair
from tests.keyclient.test_session import Pair, Recorder, make_pair

PROTECTED, GRACE, FAILED = (SessionState.PROTECTED, SessionState.GRACE,
                            SessionState.FAILED_CLOSED)
QKD_SOURCE = {SupplyMode.QKD: KeySource.QKD, SupplyMode.HYBRID: KeySource.HYBRID,
              SupplyMode.QKD_OR_PQC: KeySource.QKD}


@pytest.fixture
def make(kmes: KmePair) -> Iterator[Callable[..., Pair]]:
    made: list[Pair] = []

    def make(**policy: Any) -> Pair:
        p = make_pair(kmes, **policy)
        made.append(p)
        return p

    yield make
    for p in made:
        p.master.stop()
        p.slave.stop()


def restart_master(p: Pair, kmes: KmePair) -> None:
    """A new master process: fresh state, same SAE, reconnecting to the slave."""
    p.mi = Recorder()
    p.master = KeySession("master", kme=kmes.client("SAE_1", retries=0), local_sae="SAE_1",
                          peer_sae="SAE_2", channel=p.sch.rejoin(), installer=p.mi,
                          policy=p.master.policy, clock=p.clock)
    p.master.start(thread=False)


def both_protected(p: Pair, source: KeySource) -> bool:
    m, s = p.master.status(), p.slave.status()
    return (m.state is s.state is PROTECTED and m.source is source
            and m.epoch == s.epoch and m.epoch in p.si.keys)


# -- the slave's KME (KME_B) goes down -----------------------------------------------------------

@pytest.mark.parametrize("mode", list(SupplyMode))
def test_slave_kme_outage_under_each_policy(kmes: KmePair, make: Callable[..., Pair],
                                            mode: SupplyMode) -> None:
    # KME_A cannot reserve a key at KME_B for the slave, so it hands out none (503).
    grace = 5.0 if mode is SupplyMode.QKD else 0.0
    p = make(mode=mode, pool_target=0, pool_low=0, grace_s=grace)
    p.run(1)
    assert both_protected(p, QKD_SOURCE[mode]) and p.master.status().epoch == 1
    kmes.stop("KME_B")
    if mode is SupplyMode.QKD_OR_PQC:
        p.run(10)  # the rekey at 10 s finds no QKD key: ML-KEM-768 alone
        assert both_protected(p, KeySource.PQC) and p.master.status().key_id is None
        assert p.same_keys()[-1] == p.master.status().epoch
        assert not p.mi.kinds("invalidate") and not p.si.kinds("invalidate")
    else:
        if mode is SupplyMode.QKD:
            p.run(13.5)  # rekey due at 1010, failing; the grace ends at 1015
            st = p.master.status()
            assert st.state is GRACE and st.epoch == 1 and p.mi.active == 1
            assert not p.mi.kinds("invalidate")
        p.run(1 if mode is SupplyMode.QKD else 10)  # to 1015.5 (qkd) or 1011 (hybrid)
        st = p.master.status()
        assert st.state is FAILED and "no QKD key" in (st.last_error or "")
        assert "KME_B" in (st.last_error or "")  # KME_A said which peer is missing
        assert p.mi.kinds("invalidate") == [st.last_error] and not p.mi.keys
        # the slave keeps its key to the end of its lifetime (10 + grace + 2 s), no further
        assert p.slave.status().state is PROTECTED and p.si.active == 1
        p.run_until(lambda: p.slave.status().state is FAILED, limit_s=12 + grace)
        assert p.clock.now >= 1000 + 12 + grace - 0.05 and not p.si.keys
    kmes.start("KME_B")
    p.run_until(lambda: both_protected(p, QKD_SOURCE[mode]))
    p.run(1.5)  # past the overlap: only the new epoch left
    st = p.master.status()
    assert st.epoch is not None and st.key_id is not None and p.same_keys() == [st.epoch]
    assert p.mi.keys[st.epoch].source is QKD_SOURCE[mode]


def test_slave_kme_down_between_enc_keys_and_dec_keys(kmes: KmePair,
                                                      make: Callable[..., Pair]) -> None:
    p = make(pool_target=0, pool_low=0, grace_s=5.0)
    p.run(1)
    p.clock.now += 10
    p.master.poll()  # enc_keys at KME_A (reserved at KME_B), offer of epoch 2 sent
    assert p.mi.kinds("install") == [1, 2]
    kmes.stop("KME_B")
    p.run(0.1)  # the slave cannot fetch the key: it refuses the offer
    assert p.si.kinds("install") == [1] and p.si.active == 1
    st = p.master.status()
    assert st.state is GRACE and st.epoch == 1 and p.mi.active == 1 and 2 not in p.mi.keys
    assert "kme-unavailable" in (st.last_error or "")
    kmes.start("KME_B")
    p.run_until(lambda: both_protected(p, KeySource.QKD))
    assert p.master.status().epoch == 3  # epoch 2 is never used again
    p.run(1.5)
    assert p.same_keys() == [3] and not p.si.kinds("invalidate")


def test_slave_alone_cut_off_from_its_kme_falls_back_to_ml_kem(kmes: KmePair,
                                                               make: Callable[..., Pair]) -> None:
    # KME_A still reaches KME_B and hands the master keys; only the slave cannot fetch them.
    p = make(mode=SupplyMode.QKD_OR_PQC, pool_target=0, pool_low=0, grace_s=0.0)
    p.run(1)
    assert both_protected(p, KeySource.QKD)
    reachable = p.slave.kme
    p.slave.kme = Etsi014Client("https://127.0.0.1:9", kmes.pki.sae_files("SAE_2"), retries=0)
    try:
        p.run(10)  # the QKD offer at 10 s is refused (kme-unavailable): ML-KEM at once
        assert both_protected(p, KeySource.PQC) and p.same_keys()[-1] == p.master.status().epoch
        assert not p.mi.kinds("invalidate") and not p.si.kinds("invalidate")
        p.run(20)  # further rekeys stay on ML-KEM while QKD is paused, without a failure
        assert both_protected(p, KeySource.PQC) and not p.mi.kinds("invalidate")
    finally:
        p.slave.kme = reachable
    # After the pause (4 rekey intervals) the master offers QKD again, and the slave takes it.
    p.run_until(lambda: both_protected(p, KeySource.QKD), limit_s=45)
    assert not p.si.kinds("invalidate")


# -- the master dies mid-rekey -------------------------------------------------------------------

@pytest.mark.parametrize("when", ["before-the-slave-read-the-offer", "after-the-slave-confirmed"])
def test_master_dies_between_offer_and_commit(kmes: KmePair, make: Callable[..., Pair],
                                              when: str) -> None:
    p = make(grace_s=4.0)
    p.run(1)
    p.clock.now += 10
    offer_at: float = p.clock.now
    p.master.poll()  # offer of epoch 2 sent (installed inbound at the master first)
    assert p.mi.kinds("install") == [1, 2] and p.master.status().epoch == 1
    offered = p.mi.keys[2].secret.expose()
    if when == "after-the-slave-confirmed":
        p.slave.poll()  # rekey_ok goes out; the master never reads it
    p.mch.close()
    p.master.stop()
    p.slave.poll()
    st = p.slave.status()
    if when == "before-the-slave-read-the-offer":
        # Its confirmation could not reach the master: the slave keeps epoch 1 and
        # does not keep epoch 2 (the master never switched to it).
        assert st.epoch == 1 and p.si.active == 1 and set(p.si.keys) == {1}
        assert p.si.kinds("activate") == [1] and p.si.kinds("retire") == [2]
        assert "could not confirm epoch 2" in (st.last_error or "")
        last_use = 1000.0 + 10 + 4 + 2  # epoch 1's lifetime: interval + grace + ack timeout
    else:
        # Agreed on both sides (the same bytes the master derived), so the slave sends
        # under it; epoch 1 stays installed, as no commit came to retire it.
        assert st.epoch == 2 and p.si.keys[2].secret.expose() == offered
        assert set(p.si.keys) == {1, 2}
        last_use = offer_at + 10 + 4 + 2
    # No master: the slave protects with what it has up to the lifetime, then fails closed.
    p.run(last_use - p.clock.now - 0.3)
    assert p.slave.status().state is PROTECTED and not p.si.kinds("invalidate")
    p.run(0.6)
    assert p.slave.status().state is FAILED and not p.si.keys
    # A restarted master agrees fresh keys, at an epoch neither side has used.
    restart_master(p, kmes)
    p.run_until(lambda: both_protected(p, KeySource.QKD))
    st = p.master.status()
    assert st.epoch == 3 and p.same_keys() == [3]
    assert p.mi.keys[3].secret.expose() != offered


def test_restarted_master_within_the_lifetime_replaces_the_unconfirmed_epochs(
        kmes: KmePair, make: Callable[..., Pair]) -> None:
    p = make(grace_s=4.0)
    p.run(1)
    p.clock.now += 10
    p.master.poll()
    p.slave.poll()  # epoch 2 confirmed, but the commit never comes
    p.mch.close()
    p.master.stop()
    p.run(3)
    assert set(p.si.keys) == {1, 2}  # no commit: nothing retired yet
    restart_master(p, kmes)
    p.run_until(lambda: both_protected(p, KeySource.QKD))
    assert p.master.status().epoch == 3 and p.same_keys() == [3]
    p.run(1.5)  # the new master's commit plus the overlap (1 s)
    assert set(p.si.keys) == {3} and p.si.kinds("retire") == [1, 2]
    assert not p.si.kinds("invalidate")


# -- the peer gateway goes away, with a grace period --------------------------------------------

@pytest.mark.parametrize("mode", list(SupplyMode))
def test_slave_gone_master_keeps_its_key_for_the_grace(
        make: Callable[..., Pair], mode: SupplyMode) -> None:
    # ML-KEM needs the peer as much as QKD does: no policy has a fallback without it.
    p = make(mode=mode, grace_s=5.0)
    p.run(1)
    assert p.master.status().epoch == 1
    p.sch.close()
    p.slave.stop()
    p.run(13.5)  # rekey due at 10 s: the peer is not connected; grace to 15 s
    st = p.master.status()
    assert st.state is GRACE and st.epoch == 1 and p.mi.active == 1
    assert "not connected" in (st.last_error or "") and not p.mi.kinds("invalidate")
    p.run(1)
    st = p.master.status()
    assert st.state is FAILED and p.mi.kinds("invalidate") and not p.mi.keys


@pytest.mark.parametrize("mode", list(SupplyMode))
def test_master_gone_slave_keeps_its_key_for_the_grace(
        make: Callable[..., Pair], mode: SupplyMode) -> None:
    p = make(mode=mode, grace_s=5.0)
    p.run(1)
    activated = 1000.0  # the first key is agreed at the first poll
    assert p.slave.status().epoch == 1
    p.mch.close()
    p.master.stop()
    p.run(activated + 10 + 5 + 2 - p.clock.now - 0.3)
    st = p.slave.status()
    assert st.state is PROTECTED and st.epoch == 1 and p.si.active == 1
    assert not p.si.kinds("invalidate")
    p.run(0.6)
    st = p.slave.status()
    assert st.state is FAILED and "within the key lifetime" in (st.last_error or "")
    assert p.si.kinds("invalidate") and not p.si.keys


def test_peer_back_within_the_grace_resumes_without_failing(
        kmes: KmePair, make: Callable[..., Pair]) -> None:
    p = make(grace_s=5.0)
    p.run(1)
    p.sch.close()
    p.slave.stop()
    p.run(12)
    assert p.master.status().state is GRACE
    p.si = Recorder()
    p.slave = KeySession("slave", kme=kmes.client("SAE_2", retries=0), local_sae="SAE_2",
                         peer_sae="SAE_1", channel=p.mch.rejoin(), installer=p.si,
                         policy=p.master.policy, clock=p.clock)
    p.slave.start(thread=False)
    p.run(1)
    st = p.master.status()
    assert st.state is PROTECTED and st.epoch == 2 and p.same_keys() == [2]
    assert not p.mi.kinds("invalidate")

