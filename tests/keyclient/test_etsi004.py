"""`keyclient.Etsi004Client`, `StreamKeySupply`, and a KeySession on an ETSI 004 stream.

Real KMEs over mutual TLS (tests/harness.py); the sessions are driven by a fake
clock as in test_session.py, while the KMEs run in real time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from keyclient import (
    Etsi004Client,
    KeyStreamError,
    KeyStreamRefused,
    KeyStreamUnavailable,
    KMEBadRequest,
    KMEUnauthorized,
    KMEUnavailable,
    KMEUnreachable,
    Qos,
    SessionStreamSupply,
    StreamKeySupply,
    StreamStatus,
)
from keyclient.control import LoopbackChannel
from keyclient.policy import KeySource, SessionPolicy
from keyclient.session import KeySession, SessionState
from kme.wire004 import Status
from tests.harness import SAES, KmePair, free_port
from tests.keyclient.test_session import FakeClock, Pair, Recorder


def client(kmes: KmePair, sae: str, kme: str | None = None) -> Etsi004Client:
    c = Etsi004Client(kmes.url(kme or SAES[sae]), kmes.pki.sae_files(sae))
    kmes.on_close(c.close)
    return c


@pytest.fixture
def c1(kmes: KmePair) -> Etsi004Client:
    return client(kmes, "SAE_1")


@pytest.fixture
def c2(kmes: KmePair) -> Etsi004Client:
    return client(kmes, "SAE_2")


def test_status_codes_match_the_kme() -> None:
    assert [(s.name, s.value) for s in StreamStatus] == [(s.name, s.value) for s in Status]
    assert list(StreamStatus) == list(range(9))


def test_open_read_close(c1: Etsi004Client, c2: Etsi004Client) -> None:
    src = c1.open_connect("SAE_1", "SAE_2", Qos(Key_chunk_size=64, Timeout=2000))
    assert src.status is StreamStatus.SUCCESSFUL and src.peer_connected
    assert src.qos.Key_chunk_size == 64 and src.qos.Timeout == 2000 and src.qos.TTL == 3600
    dst = c2.open_connect("SAE_1", "SAE_2", key_stream_id=src.key_stream_id)
    assert dst.key_stream_id == src.key_stream_id and dst.peer_connected
    a = [c1.get_key(src.key_stream_id) for _ in range(3)]
    b = [c2.get_key(src.key_stream_id, i) for i in range(3)]
    assert [x.index for x in a] == [0, 1, 2]
    assert [x.secret for x in a] == [x.secret for x in b]
    assert all(len(x.secret) == 64 for x in a) and a[0].metadata is not None
    assert a[0].secret.expose().hex() not in repr(a[0])
    c1.close_stream(src.key_stream_id)
    with pytest.raises(KMEBadRequest) as info:
        c1.get_key(src.key_stream_id)
    assert not isinstance(info.value, KeyStreamError)  # an HTTP 400, not a 004 status


def test_status_codes_become_typed_errors(c1: Etsi004Client, c2: Etsi004Client) -> None:
    ksid = str(uuid.uuid4())
    waiting = c2.open_connect("SAE_1", "SAE_2", Qos(Timeout=100), ksid)
    assert waiting.status is StreamStatus.PEER_NOT_CONNECTED and not waiting.peer_connected
    with pytest.raises(KeyStreamUnavailable) as info:
        c2.get_key(ksid, 0)
    assert info.value.code == StreamStatus.GET_KEY_PEER_NOT_CONNECTED
    assert isinstance(info.value, KMEUnavailable)
    c1.open_connect("SAE_1", "SAE_2", key_stream_id=ksid)
    with pytest.raises(KeyStreamRefused) as refused:
        c1.open_connect("SAE_1", "SAE_2", key_stream_id=ksid)
    assert refused.value.code == StreamStatus.KSID_IN_USE and isinstance(refused.value,
                                                                          KMEBadRequest)
    with pytest.raises(KeyStreamRefused) as qos:
        c1.open_connect("SAE_1", "SAE_2", Qos(Min_bps=10**9))
    assert qos.value.code == StreamStatus.QOS_NOT_MET and qos.value.qos is not None
    assert qos.value.qos["Min_bps"] == 1_000_000
    with pytest.raises(KeyStreamRefused) as meta:
        c1.get_key(ksid, 0, metadata_size=4)
    assert meta.value.code == StreamStatus.METADATA_SIZE_INSUFFICIENT
    assert meta.value.metadata_size is not None and meta.value.metadata_size > 4
    assert len(c1.get_key(ksid, 0, metadata_size=meta.value.metadata_size).secret) == 32
    with pytest.raises(KeyStreamUnavailable) as again:
        c1.get_key(ksid, 0)
    assert again.value.code == StreamStatus.GET_KEY_INSUFFICIENT_KEY
    with pytest.raises(KeyStreamUnavailable) as late:
        c2.get_key(ksid, 300)
    assert late.value.code == StreamStatus.TIMEOUT_ERROR
    with pytest.raises(KeyStreamUnavailable) as none:
        c1.open_connect("SAE_1", "SAE_4")
    assert none.value.code == StreamStatus.NO_QKD_CONNECTION


def test_http_errors(kmes: KmePair) -> None:
    intruder = client(kmes, "SAE_2", "KME_A")
    with pytest.raises(KMEUnauthorized):
        intruder.open_connect("SAE_1", "SAE_2")
    gone = Etsi004Client(f"https://localhost:{free_port()}", kmes.pki.sae_files("SAE_1"))
    with gone, pytest.raises(KMEUnreachable):
        gone.open_connect("SAE_1", "SAE_2")
    with pytest.raises(ValueError):
        Etsi004Client("http://localhost:1", kmes.pki.sae_files("SAE_1"))


# -- StreamKeySupply -------------------------------------------------------------------

@pytest.fixture
def supplies(c1: Etsi004Client, c2: Etsi004Client) -> tuple[StreamKeySupply, StreamKeySupply]:
    master = StreamKeySupply.open(c1, source="SAE_1", destination="SAE_2", local_sae="SAE_1",
                                  qos=Qos(Timeout=300))
    slave = StreamKeySupply.open(c2, source="SAE_1", destination="SAE_2", local_sae="SAE_2",
                                 key_stream_id=master.key_stream_id)
    assert master.peer_sae == "SAE_2" and slave.peer_sae == "SAE_1"
    return master, slave


def test_supply_key_ids_name_stream_and_index(
        supplies: tuple[StreamKeySupply, StreamKeySupply]) -> None:
    master, slave = supplies
    keys = master.get_keys("SAE_2", 3, 256)
    assert [k.key_id for k in keys] == [f"{master.key_stream_id}:{i}" for i in range(3)]
    got = slave.get_keys_with_ids("SAE_1", [keys[2].key_id, keys[0].key_id])
    assert [k.key_id for k in got] == [keys[2].key_id, keys[0].key_id]
    assert got[0].secret == keys[2].secret and got[1].secret == keys[0].secret
    assert master.get_keys("SAE_2")[0].key_id.endswith(":3")


def test_supply_refuses_what_the_stream_cannot_give(
        supplies: tuple[StreamKeySupply, StreamKeySupply]) -> None:
    master, slave = supplies
    with pytest.raises(KMEBadRequest):
        master.get_keys("SAE_3", 1)
    with pytest.raises(KMEBadRequest):
        master.get_keys("SAE_2", 1, 512)  # chunks are 256 bits
    for bad in (str(uuid.uuid4()), f"{uuid.uuid4()}:0", f"{slave.key_stream_id}:x"):
        with pytest.raises(KMEBadRequest):
            slave.get_keys_with_ids("SAE_1", [bad])


def test_supply_keeps_chunks_read_for_a_failed_call(
        supplies: tuple[StreamKeySupply, StreamKeySupply]) -> None:
    master, slave = supplies
    (key,) = master.get_keys("SAE_2", 1)
    far = f"{master.key_stream_id}:900"
    with pytest.raises(KeyStreamUnavailable):  # chunk 900 never comes: a timeout
        slave.get_keys_with_ids("SAE_1", [key.key_id, far])
    # The chunk read for the failed call is not lost (the KME hands it out only once).
    (again,) = slave.get_keys_with_ids("SAE_1", [key.key_id])
    assert again.secret == key.secret
    slave.close()
    master.close()


# -- a KeySession on a 004 stream ------------------------------------------------------

@pytest.fixture
def stream_pair(kmes: KmePair, supplies: tuple[StreamKeySupply, StreamKeySupply]
                ) -> Iterator[Pair]:
    master_supply, slave_supply = supplies
    clock = FakeClock()
    pol = SessionPolicy(rekey_interval_s=10.0, overlap_s=1.0, ack_timeout_s=2.0, retry_s=0.5,
                        pool_target=4, pool_low=1)
    mch, sch = LoopbackChannel.pair()
    mi, si = Recorder(), Recorder()
    master = KeySession("master", kme=master_supply, local_sae="SAE_1", peer_sae="SAE_2",
                        channel=mch, installer=mi, policy=pol, clock=clock)
    slave = KeySession("slave", kme=slave_supply, local_sae="SAE_2", peer_sae="SAE_1",
                       channel=sch, installer=si, policy=pol, clock=clock)
    slave.start(thread=False)
    master.start(thread=False)
    yield Pair(master, slave, mi, si, clock, mch, sch)
    master.stop()
    slave.stop()


def test_key_session_runs_on_a_004_stream(stream_pair: Pair,
                                          supplies: tuple[StreamKeySupply, StreamKeySupply]
                                          ) -> None:
    p = stream_pair
    p.run(35)
    st = p.master.status()
    assert st.state is SessionState.PROTECTED and st.rekeys == 4 and st.rekey_failures == 0
    assert p.slave.status().epoch == st.epoch == 4
    assert p.same_keys() == [4]
    key = p.mi.keys[4]
    assert key.source is KeySource.QKD
    assert key.key_id is not None and key.key_id.startswith(supplies[0].key_stream_id + ":")
    # the pool was filled from the stream and announced: both sides fetched the same chunks
    assert p.master.status().keys_fetched == p.slave.status().keys_fetched >= 4
    assert key.secret.expose().hex() not in repr(p.master.status())


# -- SessionStreamSupply: streams opened as the pair needs them --------------------------

def test_session_supply_master_opens_and_slave_follows_new_streams(
        c1: Etsi004Client, c2: Etsi004Client, kmes: KmePair) -> None:
    master = SessionStreamSupply(c1, local_sae="SAE_1", peer_sae="SAE_2",
                                 qos=Qos(Timeout=300))
    slave = SessionStreamSupply(c2, local_sae="SAE_2", peer_sae="SAE_1")
    assert master.key_stream_id is None       # nothing opened before the first key
    first = master.get_keys("SAE_2", 2)
    ksid = master.key_stream_id
    assert ksid is not None and all(k.key_id.startswith(ksid + ":") for k in first)
    got = slave.get_keys_with_ids("SAE_1", [k.key_id for k in first])
    assert [k.secret.expose() for k in got] == [k.secret.expose() for k in first]
    assert slave.key_stream_id == ksid

    # A restarted master opens a new stream; the slave follows it from the key_IDs alone.
    again = SessionStreamSupply(client(kmes, "SAE_1"), local_sae="SAE_1", peer_sae="SAE_2",
                                qos=Qos(Timeout=300))
    (key,) = again.get_keys("SAE_2", 1)
    assert again.key_stream_id not in (None, ksid)
    (same,) = slave.get_keys_with_ids("SAE_1", [key.key_id])
    assert same.secret.expose() == key.secret.expose()

    # A restarted slave takes up the stream its earlier run opened at its KME.
    (later,) = again.get_keys("SAE_2", 1)
    fresh = SessionStreamSupply(client(kmes, "SAE_2"), local_sae="SAE_2", peer_sae="SAE_1")
    (taken,) = fresh.get_keys_with_ids("SAE_1", [later.key_id])
    assert taken.secret.expose() == later.secret.expose()

    with pytest.raises(KMEBadRequest, match="one ETSI 004 stream"):
        fresh.get_keys_with_ids("SAE_1", [first[0].key_id, later.key_id])
