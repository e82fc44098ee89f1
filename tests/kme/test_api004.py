"""ETSI GS QKD 004 V2.1.1 key streams on the KME simulator, over raw HTTPS.

Every 004 status code comes from a real situation here: links without key,
a stopped peer KME, SAEs with no QKD link between their KMEs, a destination
that opens before its source, Max_bps pacing, metadata buffers too small.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kme.wire004 import Status, chunk_id
from qgw.pki import Pki
from qgw.tls import client_context
from tests.harness import KmePair
from tests.kme.raw import Raw
from tests.kme.raw import error as raw_error
from tests.kme.scrape import sample, scrape

OPEN, GET, CLOSE = "/api/v2/004/open_connect", "/api/v2/004/get_key", "/api/v2/004/close"


class Raw004(Raw):
    """An SAE's raw client with the 004 calls (every one a POST)."""

    TIMEOUT_S = 40.0  # a KME that does not answer fails the test rather than hangs it

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        return self.call("POST", path, body, raw)

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A 004 call that must get an HTTP 200 answer; returns the body."""
        code, answer = self.post(path, body)
        assert code == 200, answer
        assert isinstance(answer.get("status"), int)
        if answer["status"] != 0:
            assert isinstance(answer.get("message"), str) and answer["message"]
        return answer

    def open(self, source: str, destination: str, ksid: str | None = None,
             **qos: Any) -> dict[str, Any]:
        return self.answer(OPEN, {"source": source, "destination": destination, "QoS": qos,
                                  "Key_stream_ID": ksid})

    def get(self, ksid: str, index: int | None = None, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"Key_stream_ID": ksid, **extra}
        if index is not None:
            body["index"] = index
        return self.answer(GET, body)


def key_of(answer: dict[str, Any]) -> bytes:
    assert answer["status"] == Status.SUCCESSFUL, answer
    return base64.b64decode(answer["key_buffer"], validate=True)


def error(code_body: tuple[int, Any], code: int) -> str:
    """An HTTP error answer's message; it carries no 004 status."""
    message = raw_error(code_body, code)
    assert "status" not in code_body[1], code_body[1]
    return message


def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.fixture
def sae_client() -> type[Raw]:
    """`sae1` and `sae2` (tests/kme/conftest.py) with the 004 calls."""
    return Raw004


@pytest.fixture
def stream(sae1: Raw004, sae2: Raw004) -> str:
    """A stream SAE_1 -> SAE_2 open at both ends."""
    ksid = sae1.open("SAE_1", "SAE_2")["Key_stream_ID"]
    assert sae2.open("SAE_1", "SAE_2", ksid)["status"] == Status.SUCCESSFUL
    return str(ksid)


# -- the stream: same chunk at both ends, once each -----------------------------------

def test_open_fills_in_qos_and_both_ends_read_the_same_chunks(sae1: Raw004, sae2: Raw004) -> None:
    opened = sae1.open("SAE_1", "SAE_2")
    assert opened["status"] == Status.SUCCESSFUL  # chunk 0 is at KME_B already
    ksid = opened["Key_stream_ID"]
    assert str(uuid.UUID(ksid)) == ksid
    assert opened["QoS"] == {"Key_chunk_size": 32, "Max_bps": 1_000_000, "Min_bps": 0,
                             "Jitter": 0, "Priority": 0, "Timeout": 1000, "TTL": 3600,
                             "Metadata_mimetype": "application/json"}
    other = sae2.open("SAE_1", "SAE_2", ksid.upper(), Key_chunk_size=32, Jitter=3, Priority=2)
    assert other["status"] == Status.SUCCESSFUL and other["Key_stream_ID"] == ksid
    assert other["QoS"]["Jitter"] == 3 and other["QoS"]["Priority"] == 2
    src = [key_of(sae1.get(ksid)) for _ in range(6)]       # the next index each time
    dst = [key_of(sae2.get(ksid, i)) for i in range(6)]    # explicit indices
    assert src == dst
    assert len(set(src)) == 6 and all(len(k) == 32 for k in src)
    answer = sae2.get(ksid)  # after 5 comes 6, on this side too
    assert answer["index"] == 6
    assert key_of(answer) == key_of(sae1.get(ksid, 6))


def test_metadata_names_the_chunk(sae1: Raw004, stream: str) -> None:
    answer = sae1.get(stream, 0)
    meta = answer["Metadata"]
    assert meta["Metadata_size"] == len(meta["Metadata_buffer"].encode())
    assert json.loads(meta["Metadata_buffer"]) == {
        "Key_stream_ID": stream, "index": 0, "key_ID": chunk_id(stream, 0),
        "source": "SAE_1", "destination": "SAE_2"}
    assert chunk_id(stream, 0) == str(uuid.uuid5(uuid.UUID(stream), "0"))


def test_each_chunk_is_handed_once_to_each_side(sae1: Raw004, sae2: Raw004, stream: str) -> None:
    assert key_of(sae1.get(stream, 0)) == key_of(sae2.get(stream, 0))
    for sae in (sae1, sae2):
        again = sae.get(stream, 0)
        assert again["status"] == Status.GET_KEY_INSUFFICIENT_KEY
        assert "already" in again["message"] and "key_buffer" not in again


def test_destination_first_is_not_connected_until_the_source_opens(sae1: Raw004,
                                                                   sae2: Raw004) -> None:
    ksid = str(uuid.uuid4())
    opened = sae2.open("SAE_1", "SAE_2", ksid, Timeout=200)
    assert opened["status"] == Status.PEER_NOT_CONNECTED and opened["Key_stream_ID"] == ksid
    started = time.monotonic()
    waited = sae2.get(ksid, 0)
    assert waited["status"] == Status.GET_KEY_PEER_NOT_CONNECTED
    assert time.monotonic() - started >= 0.2  # it waited the Timeout for the chunk
    assert sae1.open("SAE_1", "SAE_2", ksid)["status"] == Status.SUCCESSFUL
    assert key_of(sae2.get(ksid, 0)) == key_of(sae1.get(ksid, 0))


def test_destination_waits_for_a_chunk_the_source_has_not_read(sae1: Raw004, sae2: Raw004) -> None:
    ksid = sae1.open("SAE_1", "SAE_2")["Key_stream_ID"]
    sae2.open("SAE_1", "SAE_2", ksid, Timeout=3000)
    sae1.get(ksid, 9)  # made on demand now, while...
    assert key_of(sae2.get(ksid, 10))  # ... chunk 10 is made ahead of the source's reads


def test_chunk_that_does_not_come_is_a_timeout(sae1: Raw004, sae2: Raw004, stream: str) -> None:
    started = time.monotonic()
    answer = sae2.get(stream, 500)  # the source connected, but never read near 500
    assert answer["status"] == Status.TIMEOUT_ERROR and answer["index"] == 500
    assert 1.0 <= time.monotonic() - started < 5.0  # the default Timeout, 1000 ms
    assert key_of(sae2.get(stream, 0))  # the stream still works


def test_max_bps_paces_the_producer(sae1: Raw004, sae2: Raw004) -> None:
    # 256 bit/s with 32-byte chunks: one chunk a second; chunk 0 is made at OPEN_CONNECT.
    opened = sae1.open("SAE_1", "SAE_2", Max_bps=256, Timeout=100)
    ksid = opened["Key_stream_ID"]
    assert opened["QoS"]["Max_bps"] == 256
    assert key_of(sae1.get(ksid, 0))
    answer = sae1.get(ksid, 1)
    assert answer["status"] == Status.TIMEOUT_ERROR and "Max_bps" in answer["message"]
    wait_until(lambda: sae1.get(ksid, 1)["status"] == Status.SUCCESSFUL, 5.0)


def test_metadata_buffer_too_small(sae1: Raw004, stream: str) -> None:
    short = sae1.get(stream, 0, Metadata={"Metadata_size": 10})
    assert short["status"] == Status.METADATA_SIZE_INSUFFICIENT and "key_buffer" not in short
    need = short["Metadata"]["Metadata_size"]
    assert need > 10
    # Nothing was handed out: the same chunk comes with a buffer of the size asked for.
    answer = sae1.get(stream, 0, Metadata={"Metadata_size": need})
    assert key_of(answer) and answer["Metadata"]["Metadata_size"] == need


# -- opening --------------------------------------------------------------------------

def test_ksid_in_use(kmes: KmePair, sae1: Raw004, sae2: Raw004, stream: str) -> None:
    for sae, source, dest in ((sae1, "SAE_1", "SAE_2"), (sae2, "SAE_1", "SAE_2")):
        again = sae.open(source, dest, stream)
        assert again["status"] == Status.KSID_IN_USE and again["Key_stream_ID"] == stream
    # another SAE of the same KME cannot take it either (chunk key_IDs must not collide)
    sae4 = Raw004(kmes, "SAE_4")
    assert sae4.open("SAE_4", "SAE_3", stream)["status"] == Status.KSID_IN_USE
    # nor can it be opened again after CLOSE
    assert sae1.answer(CLOSE, {"Key_stream_ID": stream})["status"] == Status.SUCCESSFUL
    assert sae1.open("SAE_1", "SAE_2", stream)["status"] == Status.KSID_IN_USE


@pytest.mark.parametrize("asked, offered", [
    ({"Min_bps": 2_000_000}, {"Min_bps": 1_000_000}),
    ({"Key_chunk_size": 4096}, {"Key_chunk_size": 1024}),
    ({"Key_chunk_size": 0}, {"Key_chunk_size": 8}),
    ({"Max_bps": 100, "Min_bps": 500}, {"Max_bps": 500, "Min_bps": 500}),
    ({"Timeout": 60_000}, {"Timeout": 30_000}),
    ({"TTL": 0}, {"TTL": 1}),
    ({"Metadata_mimetype": "text/plain"}, {"Metadata_mimetype": "application/json"}),
])
def test_qos_not_met_gives_a_counter_proposal(sae1: Raw004, asked: dict[str, Any],
                                              offered: dict[str, Any]) -> None:
    answer = sae1.open("SAE_1", "SAE_2", **asked)
    assert answer["status"] == Status.QOS_NOT_MET
    assert answer["QoS"].items() >= offered.items()
    # The counter-proposal is accepted as it stands.
    again = sae1.open("SAE_1", "SAE_2", **answer["QoS"])
    assert again["status"] == Status.SUCCESSFUL and again["QoS"] == answer["QoS"]


@pytest.mark.parametrize("sae, source, destination", [
    ("SAE_1", "SAE_1", "SAE_4"),   # both SAEs at KME_A
    ("SAE_1", "SAE_1", "SAE_9"),   # KME_C: no QKD link from KME_A
    ("SAE_3", "SAE_9", "SAE_3"),   # the destination's side of the same
])
def test_no_qkd_connection(kmes: KmePair, sae: str, source: str, destination: str) -> None:
    answer = Raw004(kmes, sae).open(source, destination, str(uuid.uuid4()))
    assert answer["status"] == Status.NO_QKD_CONNECTION


def test_peer_kme_down_is_no_qkd_connection(kmes: KmePair, sae1: Raw004, stream: str) -> None:
    assert key_of(sae1.get(stream, 0))
    kmes.stop("KME_B")
    assert sae1.get(stream, 40)["status"] == Status.NO_QKD_CONNECTION
    assert sae1.open("SAE_1", "SAE_2")["status"] == Status.NO_QKD_CONNECTION


def test_link_without_key(tmp_path: Path, pki: Pki) -> None:
    pair = KmePair(tmp_path, pki, rate_bps=0).start()
    try:
        sae1, sae2 = Raw004(pair, "SAE_1"), Raw004(pair, "SAE_2")
        links = [pair.servers[a].kme.links[b] for a, b in (("KME_A", "KME_B"), ("KME_B", "KME_A"))]
        wait_until(lambda: all(link.up for link in links))
        # open, but chunk 0 could not be placed at KME_B: the peer is not connected
        ksid = str(uuid.uuid4())
        assert sae1.open("SAE_1", "SAE_2", ksid)["status"] == Status.PEER_NOT_CONNECTED
        assert sae1.get(ksid)["status"] == Status.GET_KEY_INSUFFICIENT_KEY
        assert sae2.open("SAE_1", "SAE_2", ksid, Timeout=100)["status"] == \
            Status.PEER_NOT_CONNECTED
        assert sae2.get(ksid, 0)["status"] == Status.GET_KEY_PEER_NOT_CONNECTED
    finally:
        pair.close()


# -- CLOSE and TTL --------------------------------------------------------------------

def test_close_ends_the_stream_at_this_kme_only(sae1: Raw004, sae2: Raw004, stream: str) -> None:
    first = key_of(sae1.get(stream, 0))
    assert sae1.answer(CLOSE, {"Key_stream_ID": stream}) == {"status": 0}
    error(sae1.post(GET, {"Key_stream_ID": stream}), 400)
    error(sae1.post(CLOSE, {"Key_stream_ID": stream}), 400)
    # The destination still reads what was made before the source closed.
    assert key_of(sae2.get(stream, 0)) == first
    assert sae2.answer(CLOSE, {"Key_stream_ID": stream})["status"] == Status.SUCCESSFUL


def test_close_discards_unread_chunks(kmes: KmePair, sae1: Raw004, sae2: Raw004,
                                      stream: str) -> None:
    store_b = kmes.servers["KME_B"].kme.store
    wait_until(lambda: store_b.key_record(chunk_id(stream, 3)) is not None)  # made ahead
    sae2.answer(CLOSE, {"Key_stream_ID": stream})
    assert all(store_b.key_record(chunk_id(stream, i)) is None for i in range(8))
    store_a = kmes.servers["KME_A"].kme.store
    assert store_a.key_record(chunk_id(stream, 0)) is not None
    sae1.answer(CLOSE, {"Key_stream_ID": stream})
    assert all(store_a.key_record(chunk_id(stream, i)) is None for i in range(8))


def test_stream_unused_for_its_ttl_is_closed(sae1: Raw004) -> None:
    ksid = sae1.open("SAE_1", "SAE_2", TTL=1)["Key_stream_ID"]
    assert key_of(sae1.get(ksid))
    time.sleep(1.1)
    assert "no open key stream" in error(sae1.post(GET, {"Key_stream_ID": ksid}), 400)


# -- bad requests and wrong certificates ---------------------------------------------

@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b"null", b"\xff", b'"x"'])
@pytest.mark.parametrize("path", [OPEN, GET, CLOSE])
def test_malformed_json_is_400(sae1: Raw004, path: str, raw: bytes) -> None:
    error(sae1.post(path, raw=raw), 400)


@pytest.mark.parametrize("body", [
    {}, {"source": "SAE_1"}, {"source": 1, "destination": "SAE_2"},
    {"source": "SAE_1", "destination": "SAE_2", "QoS": "fast"},
    {"source": "SAE_1", "destination": "SAE_2", "QoS": {"Min_bps": -1}},
    {"source": "SAE_1", "destination": "SAE_2", "QoS": {"Timeout": "1"}},
    {"source": "SAE_1", "destination": "SAE_2", "QoS": {"TTL": True}},
    {"source": "SAE_1", "destination": "SAE_2", "QoS": {"Max_bps": 2**32}},
    {"source": "SAE_1", "destination": "SAE_2", "QoS": {"Metadata_mimetype": 7}},
    {"source": "SAE_1", "destination": "SAE_2", "Key_stream_ID": "not-a-uuid"},
    {"source": "SAE_1", "destination": "SAE_404"},
    {"source": "SAE_1", "destination": "SAE_1"},
])
def test_open_connect_bad_bodies(sae1: Raw004, body: dict[str, Any]) -> None:
    error(sae1.post(OPEN, body), 400)


def test_destination_must_name_the_stream(sae2: Raw004) -> None:
    msg = error(sae2.post(OPEN, {"source": "SAE_1", "destination": "SAE_2"}), 400)
    assert "Key_stream_ID" in msg


@pytest.mark.parametrize("extra", [
    {"index": -1}, {"index": "0"}, {"index": 1.5}, {"index": 2**32},
    {"Metadata": "big"}, {"Metadata": {"Metadata_size": -5}},
])
def test_get_key_bad_bodies(sae1: Raw004, stream: str, extra: dict[str, Any]) -> None:
    error(sae1.post(GET, {"Key_stream_ID": stream} | extra), 400)
    assert key_of(sae1.get(stream, 0))  # nothing was taken


@pytest.mark.parametrize("body", [{}, {"Key_stream_ID": "x"}, {"Key_stream_ID": 5},
                                  {"Key_stream_ID": str(uuid.uuid4())}])
def test_get_key_and_close_need_an_open_stream(sae1: Raw004, body: dict[str, Any]) -> None:
    error(sae1.post(GET, body), 400)
    error(sae1.post(CLOSE, body), 400)


def test_wrong_certificates_get_401(kmes: KmePair, pki: Pki, sae1: Raw004, stream: str) -> None:
    # SAE_3 is at KME_B but is neither end of the stream it names
    msg = error(Raw004(kmes, "SAE_3").post(OPEN, {"source": "SAE_1", "destination": "SAE_2",
                                                  "Key_stream_ID": str(uuid.uuid4())}), 401)
    assert "SAE_3" in msg
    # SAE_2's certificate at SAE_1's KME
    error(Raw004(kmes, "SAE_2", "KME_A").post(OPEN, {"source": "SAE_1", "destination": "SAE_2"}),
          401)
    # another SAE of the same KME cannot read or close SAE_1's stream
    sae4 = Raw004(kmes, "SAE_4")
    error(sae4.post(GET, {"Key_stream_ID": stream, "index": 0}), 401)
    error(sae4.post(CLOSE, {"Key_stream_ID": stream}), 401)
    # a KME certificate is no SAE
    kme_b = Raw004(kmes, "SAE_1", ctx=client_context(pki.kme_files("KME_B")))
    error(kme_b.post(OPEN, {"source": "SAE_1", "destination": "SAE_2"}), 401)
    # and after all that, SAE_1 still gets chunk 0
    assert key_of(sae1.get(stream, 0))


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_are_json_405(sae1: Raw004, method: str) -> None:
    error(sae1.call(method, GET, raw=b""), 405)


# -- metrics ------------------------------------------------------------------------------

def test_metrics_count_chunks_served_and_004_outcomes(kmes: KmePair, sae1: Raw004,
                                                      sae2: Raw004, stream: str) -> None:
    for i in range(3):
        assert key_of(sae1.get(stream, i)) == key_of(sae2.get(stream, i))
    # Outcomes that are all HTTP 200 on the wire, each with its own 004 status.
    assert sae1.get(stream, 0)["status"] == Status.GET_KEY_INSUFFICIENT_KEY
    assert sae2.get(stream, 3, Metadata={"Metadata_size": 1})["status"] == \
        Status.METADATA_SIZE_INSUFFICIENT
    assert sae1.open("SAE_1", "SAE_2", stream)["status"] == Status.KSID_IN_USE
    a, b = scrape(kmes.metrics_ports["KME_A"]), scrape(kmes.metrics_ports["KME_B"])
    for text in (a, b):  # each side counts the chunks it handed to its own SAE
        assert sample(text, "qgw_kme_keys_served_total", master="SAE_1", slave="SAE_2") == 3
    assert sample(a, "qgw_kme_keys_delivered_total", role="master") == 3
    assert sample(b, "qgw_kme_keys_delivered_total", role="slave") == 3

    def outcome(text: str, call: str, status: Status) -> float | None:
        return sample(text, "qgw_kme_etsi004_outcomes_total", call=call,
                      status=str(int(status)), outcome=status.name)

    assert outcome(a, "open_connect", Status.SUCCESSFUL) == 1
    assert outcome(b, "open_connect", Status.SUCCESSFUL) == 1
    assert outcome(a, "open_connect", Status.KSID_IN_USE) == 1
    assert outcome(a, "get_key", Status.SUCCESSFUL) == 3
    assert outcome(b, "get_key", Status.SUCCESSFUL) == 3
    assert outcome(a, "get_key", Status.GET_KEY_INSUFFICIENT_KEY) == 1
    assert outcome(b, "get_key", Status.METADATA_SIZE_INSUFFICIENT) == 1
    assert outcome(b, "get_key", Status.GET_KEY_INSUFFICIENT_KEY) is None
    # The HTTP view alone cannot tell them apart: all five GET_KEYs at KME_A were 200.
    assert sample(a, "qgw_kme_requests_total", call="etsi004_get_key", code="200") == 4
    for k in range(3):
        chunk = chunk_id(stream, k)
        assert chunk not in a and chunk not in b


# -- secrecy and documentation ----------------------------------------------------------

def test_keys_never_reach_logs_or_errors(caplog: pytest.LogCaptureFixture, kmes: KmePair,
                                         sae1: Raw004, sae2: Raw004) -> None:
    caplog.set_level(logging.DEBUG)
    ksid = sae1.open("SAE_1", "SAE_2")["Key_stream_ID"]
    sae2.open("SAE_1", "SAE_2", ksid, Timeout=100)
    keys = [key_of(sae1.get(ksid, i)) for i in range(3)]
    answers = [sae2.get(ksid, 0), sae2.get(ksid, 0), sae2.get(ksid, 99),
               sae1.get(ksid, 1, Metadata={"Metadata_size": 1})]
    kmes.stop("KME_B")
    answers.append(sae1.get(ksid, 50))
    assert [a["status"] for a in answers] == [0, 2, 6, 8, 4]
    text = caplog.text + json.dumps(answers[1:])
    for k in keys:
        assert base64.b64encode(k).decode() not in text and k.hex() not in text


def test_openapi_documents_the_004_paths(kmes: KmePair, sae1: Raw004) -> None:
    code, doc = sae1.call("GET", "/api/v1/openapi.json", raw=b"")
    assert code == 200
    for path in (OPEN, GET, CLOSE):
        op = doc["paths"][path]["post"]
        assert "200" in op["responses"] and "400" in op["responses"]
    text = json.dumps(doc["paths"][GET])
    assert "key_buffer" in text and "status" in text
    # Streams are relayed too (tests/kme/test_relay.py::test_etsi004_stream_across_three_hops)
    opening = " ".join(doc["paths"][OPEN]["post"]["description"].split())
    assert "trusted nodes" in opening and "need a direct" not in opening
