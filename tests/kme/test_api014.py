"""ETSI GS QKD 014 v1.1.1 conformance of the KME simulator: fields, defaults, bounds, errors.

Raw HTTPS requests (urllib3 with the SAE's certificate), so the tests see
exactly what goes over the wire, in both GET and POST forms.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import uuid
from typing import Any

import pytest
import urllib3

from qgw.pki import Pki
from qgw.tls import client_context
from tests.harness import KmePair
from tests.kme.raw import Raw, error

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
STATUS_FIELDS = {"source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID", "key_size",
                 "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
                 "min_key_size", "max_SAE_ID_count"}


@pytest.fixture
def sae3(kmes: KmePair) -> Raw:
    return Raw(kmes, "SAE_3")


def keys_of(body: dict[str, Any]) -> dict[str, bytes]:
    assert set(body) >= {"keys"}
    out = {}
    for k in body["keys"]:
        assert UUID_RE.match(k["key_ID"])
        out[k["key_ID"]] = base64.b64decode(k["key"], validate=True)
    return out


# -- status ----------------------------------------------------------------------------

def test_status_has_every_field_with_spec_units(sae1: Raw, sae2: Raw) -> None:
    status, body = sae1.call("GET", "/api/v1/keys/SAE_2/status")
    assert status == 200
    assert set(body) >= STATUS_FIELDS
    assert body["source_KME_ID"] == "KME_A" and body["target_KME_ID"] == "KME_B"
    assert body["master_SAE_ID"] == "SAE_1" and body["slave_SAE_ID"] == "SAE_2"
    assert body["key_size"] == 256 and body["min_key_size"] == 64
    assert body["max_key_size"] == 8192 and body["max_key_per_request"] == 128
    assert body["max_SAE_ID_count"] == 8
    assert body["max_key_count"] == 8 * 1024 * 1024 // 256
    assert 8 <= body["stored_key_count"] <= body["max_key_count"]
    assert isinstance(body["status_extension"], dict)
    # The slave's KME sees the same link from its side.
    status, other = sae2.call("GET", "/api/v1/keys/SAE_1/status")
    assert status == 200 and other["source_KME_ID"] == "KME_B" and other["target_KME_ID"] == "KME_A"


@pytest.mark.parametrize("slave, code", [("SAE_404", 400), ("SAE_1", 400), ("SAE_4", 400)])
def test_status_refuses_bad_slave(sae1: Raw, slave: str, code: int) -> None:
    # unknown SAE; itself; an SAE on the same KME
    error(sae1.call("GET", f"/api/v1/keys/{slave}/status"), code)


def test_unreachable_kme_has_no_keys(sae1: Raw) -> None:
    # SAE_9 is at KME_C, which no chain of links reaches: keys may come once a path exists.
    status, body = sae1.call("GET", "/api/v1/keys/SAE_9/status")
    assert status == 200 and body["target_KME_ID"] == "KME_C"
    assert body["stored_key_count"] == 0
    assert body["status_extension"]["qkdgw_relay"]["path"] is None
    for method, req in (("GET", None), ("POST", {})):
        msg = error(sae1.call(method, "/api/v1/keys/SAE_9/enc_keys", req), 503)
        assert "KME_C" in msg and "no path" in msg


# -- enc_keys ------------------------------------------------------------------------

def test_enc_keys_defaults_get_and_post(sae1: Raw) -> None:
    for method, body in (("GET", None), ("POST", {}), ("POST", None)):
        status, got = sae1.call(method, "/api/v1/keys/SAE_2/enc_keys", body)
        assert status == 200, got
        keys = keys_of(got)
        assert len(keys) == 1
        assert all(len(k) == 32 for k in keys.values())


def test_enc_keys_number_and_size(sae1: Raw) -> None:
    status, got = sae1.call("GET", "/api/v1/keys/SAE_2/enc_keys?number=3&size=512")
    assert status == 200
    assert [len(k) for k in keys_of(got).values()] == [64, 64, 64]
    status, got = sae1.call("POST", "/api/v1/keys/SAE_2/enc_keys", {"number": 2, "size": 64})
    assert status == 200
    assert [len(k) for k in keys_of(got).values()] == [8, 8]


@pytest.mark.parametrize("query", [
    "number=0", "number=-1", "number=abc", "number=1.5", "number=129", "number=",
    "size=0", "size=-8", "size=abc", "size=100", "size=56", "size=8200", "size=",
])
def test_enc_keys_get_bad_parameters(sae1: Raw, query: str) -> None:
    error(sae1.call("GET", f"/api/v1/keys/SAE_2/enc_keys?{query}"), 400)


@pytest.mark.parametrize("query", ["number=1&number=0", "number=2&number=2",
                                   "size=256&size=512", "number=1&size=256&number=3"])
def test_enc_keys_get_repeated_parameter_is_refused(sae1: Raw, query: str) -> None:
    # Not "the first one wins": the KME cannot know which one the client meant.
    msg = error(sae1.call("GET", f"/api/v1/keys/SAE_2/enc_keys?{query}"), 400)
    assert "more than once" in msg and query.split("=")[0] in msg


@pytest.mark.parametrize("body", [
    {"number": 0}, {"number": -3}, {"number": "2"}, {"number": 1.0}, {"number": True},
    {"number": 129}, {"size": 0}, {"size": 12}, {"size": "256"}, {"size": 16384},
    {"additional_slave_SAE_IDs": []}, {"additional_slave_SAE_IDs": ["SAE_3", "SAE_3"]},
    {"additional_slave_SAE_IDs": "SAE_3"}, {"additional_slave_SAE_IDs": [3]},
    {"additional_slave_SAE_IDs": ["SAE_2"]}, {"additional_slave_SAE_IDs": ["SAE_404"]},
    {"additional_slave_SAE_IDs": ["SAE_4"]}, {"additional_slave_SAE_IDs": ["SAE_1"]},
    {"extension_mandatory": [{"unknown_extension": True}]},
    {"extension_mandatory": {"x": 1}}, {"extension_optional": "x"},
])
def test_enc_keys_post_bad_bodies(sae1: Raw, body: dict[str, Any]) -> None:
    error(sae1.call("POST", "/api/v1/keys/SAE_2/enc_keys", body), 400)


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\"number\"", b"\xff\xfe", b"null"])
def test_enc_keys_post_malformed_json(sae1: Raw, raw: bytes) -> None:
    error(sae1.call("POST", "/api/v1/keys/SAE_2/enc_keys", raw=raw), 400)


def test_enc_keys_ignores_content_type_optional_extensions_and_unknown_fields(sae1: Raw) -> None:
    body = json.dumps({"number": 2, "extension_optional": [{"vendor_x": 1}], "future": "y",
                       "extension_mandatory": []}).encode()
    status, got = sae1.call("POST", "/api/v1/keys/SAE_2/enc_keys", raw=body,
                            headers={"Content-Type": "text/plain"})
    assert status == 200 and len(keys_of(got)) == 2


@pytest.mark.parametrize("slave", ["SAE_404", "SAE_1", "SAE_4"])
def test_enc_keys_bad_slave(sae1: Raw, slave: str) -> None:
    error(sae1.call("GET", f"/api/v1/keys/{slave}/enc_keys"), 400)
    error(sae1.call("POST", f"/api/v1/keys/{slave}/enc_keys", {}), 400)


def test_too_many_additional_slaves_is_refused(kmes: KmePair, sae1: Raw) -> None:
    ids = [f"SAE_{i}" for i in range(100, 109)]  # 9 > max_SAE_ID_count (8)
    msg = error(sae1.call("POST", "/api/v1/keys/SAE_2/enc_keys",
                          {"additional_slave_SAE_IDs": ids}), 400)
    assert "max_SAE_ID_count" in msg


# -- dec_keys and the key life cycle --------------------------------------------------

def test_key_delivered_to_master_and_slave_once(sae1: Raw, sae2: Raw) -> None:
    _, got = sae1.call("POST", "/api/v1/keys/SAE_2/enc_keys", {"number": 2})
    master_keys = keys_of(got)
    first, second = list(master_keys)
    status, got = sae2.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={first}")
    assert status == 200 and keys_of(got) == {first: master_keys[first]}
    status, got = sae2.call("POST", "/api/v1/keys/SAE_1/dec_keys",
                            {"key_IDs": [{"key_ID": second}], "key_IDs_extension": {}})
    assert status == 200 and keys_of(got) == {second: master_keys[second]}
    # Gone after delivery, in either form.
    error(sae2.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={first}"), 400)
    error(sae2.call("POST", "/api/v1/keys/SAE_1/dec_keys", {"key_IDs": [{"key_ID": second}]}),
          400)


def test_dec_keys_accepts_uppercase_uuid(sae1: Raw, sae2: Raw) -> None:
    _, got = sae1.call("GET", "/api/v1/keys/SAE_2/enc_keys")
    (kid,) = keys_of(got)
    status, body = sae2.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={kid.upper()}")
    assert status == 200 and list(keys_of(body)) == [kid]


def test_dec_keys_is_all_or_nothing(sae1: Raw, sae2: Raw) -> None:
    _, got = sae1.call("GET", "/api/v1/keys/SAE_2/enc_keys")
    (kid,) = keys_of(got)
    unknown = str(uuid.uuid4())
    error(sae2.call("POST", "/api/v1/keys/SAE_1/dec_keys",
                    {"key_IDs": [{"key_ID": kid}, {"key_ID": unknown}]}), 400)
    status, body = sae2.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={kid}")
    assert status == 200 and list(keys_of(body)) == [kid]


@pytest.mark.parametrize("query", ["", "key_ID=", "key_ID=not-a-uuid",
                                   "key_ID=12345678123456781234567812345678",
                                   f"key_ID={uuid.uuid4()}"])
def test_dec_keys_get_bad_key_ids(sae2: Raw, query: str) -> None:
    error(sae2.call("GET", f"/api/v1/keys/SAE_1/dec_keys?{query}"), 400)


@pytest.mark.parametrize("body", [
    {}, {"key_IDs": []}, {"key_IDs": "x"}, {"key_IDs": ["x"]}, {"key_IDs": [{}]},
    {"key_IDs": [{"key_ID": 5}]}, {"key_IDs": [{"key_ID": "nope"}]},
    {"key_IDs": [{"key_ID": str(uuid.uuid4())}]},
])
def test_dec_keys_post_bad_bodies(sae2: Raw, body: dict[str, Any]) -> None:
    error(sae2.call("POST", "/api/v1/keys/SAE_1/dec_keys", body), 400)


def test_dec_keys_duplicated_key_id(sae1: Raw, sae2: Raw) -> None:
    _, got = sae1.call("GET", "/api/v1/keys/SAE_2/enc_keys")
    (kid,) = keys_of(got)
    error(sae2.call("POST", "/api/v1/keys/SAE_1/dec_keys",
                    {"key_IDs": [{"key_ID": kid}, {"key_ID": kid}]}), 400)


def test_dec_keys_get_repeated_key_id_is_refused(sae1: Raw, sae2: Raw) -> None:
    _, got = sae1.call("GET", "/api/v1/keys/SAE_2/enc_keys?number=2")
    kid, other = keys_of(got)
    path = "/api/v1/keys/SAE_1/dec_keys"
    for query in (f"key_ID={kid}&key_ID={kid}", f"key_ID={kid}&key_ID={kid.upper()}",
                  f"key_ID={kid}&key_ID={other}&key_ID={kid}"):
        assert "twice" in error(sae2.call("GET", f"{path}?{query}"), 400)
    # Nothing was handed out by the refused requests.
    status, body = sae2.call("GET", f"{path}?key_ID={kid}&key_ID={other}")
    assert status == 200 and keys_of(body) == keys_of(got)


def test_dec_keys_master_equal_to_slave_is_refused(sae1: Raw, sae2: Raw) -> None:
    _, got = sae1.call("GET", "/api/v1/keys/SAE_2/enc_keys")
    (kid,) = keys_of(got)
    msg = error(sae2.call("POST", "/api/v1/keys/SAE_2/dec_keys", {"key_IDs": [{"key_ID": kid}]}),
                400)
    assert "master" in msg
    error(sae2.call("GET", f"/api/v1/keys/SAE_2/dec_keys?key_ID={kid}"), 400)
    status, body = sae2.call("POST", "/api/v1/keys/SAE_1/dec_keys", {"key_IDs": [{"key_ID": kid}]})
    assert status == 200 and keys_of(body) == keys_of(got)


def test_dec_keys_empty_body_and_bad_master(sae2: Raw) -> None:
    error(sae2.call("POST", "/api/v1/keys/SAE_1/dec_keys", raw=b""), 400)
    error(sae2.call("GET", f"/api/v1/keys/SAE_404/dec_keys?key_ID={uuid.uuid4()}"), 400)
    error(sae2.call("GET", f"/api/v1/keys/SAE_2/dec_keys?key_ID={uuid.uuid4()}"), 400)


def test_multicast_every_listed_slave_gets_the_key_once(sae1: Raw, sae2: Raw, sae3: Raw) -> None:
    status, got = sae1.call("POST", "/api/v1/keys/SAE_2/enc_keys",
                            {"number": 1, "additional_slave_SAE_IDs": ["SAE_3"]})
    assert status == 200
    ((kid, key),) = keys_of(got).items()
    for slave in (sae2, sae3):
        status, body = slave.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={kid}")
        assert status == 200 and keys_of(body) == {kid: key}
        error(slave.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={kid}"), 400)


# -- secrecy ---------------------------------------------------------------------------

def _renderings(key: bytes) -> list[str]:
    """Ways a key could leak into text: base64 (both alphabets), hex, a bytes repr."""
    return [base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode(),
            key.hex(), key.hex().upper(), repr(key)[2:-1]]


def test_keys_never_reach_logs_or_errors(caplog: pytest.LogCaptureFixture, kmes: KmePair,
                                         sae1: Raw, sae2: Raw, sae3: Raw) -> None:
    caplog.set_level(logging.DEBUG)
    keys: dict[str, bytes] = {}
    for method, path, body in (("GET", "enc_keys?number=2", None),
                               ("POST", "enc_keys", {"number": 2, "size": 512}),
                               ("POST", "enc_keys", {"additional_slave_SAE_IDs": ["SAE_3"]})):
        status, got = sae1.call(method, f"/api/v1/keys/SAE_2/{path}", body)
        assert status == 200
        keys |= keys_of(got)
    ids = list(keys)
    # Errors that name keys still stored: another SAE's key, the wrong master.
    errors = [
        sae3.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={ids[2]}"),
        sae2.call("GET", f"/api/v1/keys/SAE_4/dec_keys?key_ID={ids[-1]}"),
    ]
    status, got = sae2.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={ids[0]}")
    assert status == 200 and keys_of(got) == {ids[0]: keys[ids[0]]}
    status, got = sae2.call("POST", "/api/v1/keys/SAE_1/dec_keys",
                            {"key_IDs": [{"key_ID": k} for k in ids[1:]]})
    assert status == 200 and keys_of(got) == {k: keys[k] for k in ids[1:]}
    # ... keys fetched already, malformed requests, no key at all.
    errors += [
        sae2.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={ids[0]}"),
        sae2.call("POST", "/api/v1/keys/SAE_1/dec_keys", {"key_IDs": [{"key_ID": ids[1]}]}),
        sae2.call("POST", "/api/v1/keys/SAE_1/dec_keys",
                  {"key_IDs": [{"key_ID": ids[0]}, {"key_ID": ids[0]}]}),
        sae1.call("GET", "/api/v1/keys/SAE_2/enc_keys?number=1&number=2"),
        sae1.call("GET", "/api/v1/keys/SAE_9/enc_keys"),
    ]
    assert [code for code, _ in errors] == [401, 401, 400, 400, 400, 400, 503]
    assert all(isinstance(body.get("message"), str) for _, body in errors)
    # The multicast key is still waiting for SAE_3, and SAE_3's error did not spend it.
    assert sae3.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={ids[-1]}")[0] == 200
    text = caplog.text + json.dumps([body for _, body in errors])
    assert any(r.levelno == logging.DEBUG for r in caplog.records)  # capture works
    for key in keys.values():
        for leak in _renderings(key):
            assert leak not in text


# -- authorisation -------------------------------------------------------------------

def test_slave_not_in_the_pair_gets_401(sae1: Raw, sae3: Raw) -> None:
    _, got = sae1.call("GET", "/api/v1/keys/SAE_2/enc_keys")
    (kid,) = keys_of(got)
    msg = error(sae3.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={kid}"), 401)
    assert "SAE_3" in msg


def test_wrong_master_in_path_gets_401(kmes: KmePair, sae1: Raw, sae2: Raw) -> None:
    _, got = sae1.call("GET", "/api/v1/keys/SAE_2/enc_keys")
    (kid,) = keys_of(got)
    error(sae2.call("GET", f"/api/v1/keys/SAE_4/dec_keys?key_ID={kid}"), 401)
    # and the key is still there for the right request
    status, _ = sae2.call("GET", f"/api/v1/keys/SAE_1/dec_keys?key_ID={kid}")
    assert status == 200


def test_sae_of_the_other_kme_gets_401(kmes: KmePair) -> None:
    # SAE_2 belongs to KME_B; its valid certificate at KME_A is not enough.
    intruder = Raw(kmes, "SAE_2", kme="KME_A")
    msg = error(intruder.call("GET", "/api/v1/keys/SAE_1/enc_keys"), 401)
    assert "SAE_2" in msg


def _pool(kmes: KmePair, ctx: Any) -> urllib3.HTTPSConnectionPool:
    pool = urllib3.HTTPSConnectionPool("localhost", kmes.ports["KME_A"], retries=False,
                                       ssl_context=ctx)
    kmes.on_close(pool.close)
    return pool


def test_kme_certificate_cannot_use_the_sae_api(kmes: KmePair, pki: Pki) -> None:
    pool = _pool(kmes, client_context(pki.kme_files("KME_B")))
    r = pool.urlopen("GET", "/api/v1/keys/SAE_2/enc_keys")
    assert r.status == 401 and "message" in json.loads(r.data)


def test_sae_certificate_cannot_open_the_kme_link(kmes: KmePair, pki: Pki) -> None:
    pool = _pool(kmes, client_context(pki.sae_files("SAE_1")))
    r = pool.urlopen("GET", "/kme/v1/ws", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()})
    assert r.status == 401 and "message" in json.loads(r.data)


def test_certificate_from_another_ca_fails_the_handshake(kmes: KmePair, foreign_pki: Pki) -> None:
    pool = _pool(kmes, _mixed_context(foreign_pki, kmes.pki))
    # TLS 1.3: the server checks the client certificate after the client's Finished,
    # so the client sees either an alert (SSLError) or the connection closed unanswered.
    with pytest.raises((urllib3.exceptions.SSLError, urllib3.exceptions.ProtocolError)):
        pool.urlopen("GET", "/api/v1/keys/SAE_2/status")


def test_client_without_certificate_fails_the_handshake(kmes: KmePair) -> None:
    import ssl
    pool = _pool(kmes, ssl.create_default_context(cafile=str(kmes.pki.ca_cert)))
    with pytest.raises((urllib3.exceptions.SSLError, urllib3.exceptions.ProtocolError)):
        pool.urlopen("GET", "/api/v1/keys/SAE_2/status")


def _mixed_context(foreign: Pki, ours: Pki) -> Any:
    """Trusts our KME's CA, but presents a client certificate of the foreign CA."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ours.ca_cert))
    files = foreign.sae_files("SAE_1")
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


# -- exhaustion and generic HTTP errors -------------------------------------------------

def test_no_key_left_is_503_and_nothing_is_lost(tmp_path: Any, pki: Pki) -> None:
    pair = KmePair(tmp_path, pki, rate_bps=1e6, limits={"store_capacity_bits": 16 * 256}).start()
    try:
        pair.wait_for_keys(16)
        sae1, sae2 = Raw(pair, "SAE_1"), Raw(pair, "SAE_2")
        status, body = sae1.call("GET", "/api/v1/keys/SAE_2/status")
        assert body["max_key_count"] == 16 and body["stored_key_count"] == 16
        _, got = sae1.call("POST", "/api/v1/keys/SAE_2/enc_keys", {"number": 10})
        taken = keys_of(got)
        msg = error(sae1.call("POST", "/api/v1/keys/SAE_2/enc_keys", {"number": 7}), 503)
        assert "key" in msg
        # The refused request took nothing: the 6 left are still there, the 10 still fetchable.
        _, st = sae1.call("GET", "/api/v1/keys/SAE_2/status")
        assert st["stored_key_count"] >= 6
        status, body = sae2.call("POST", "/api/v1/keys/SAE_1/dec_keys",
                                 {"key_IDs": [{"key_ID": k} for k in taken]})
        assert status == 200 and keys_of(body) == taken
    finally:
        pair.close()


def test_link_with_no_key_rate_answers_503(tmp_path: Any, pki: Pki) -> None:
    pair = KmePair(tmp_path, pki, rate_bps=0).start()
    try:
        sae1 = Raw(pair, "SAE_1")
        error(sae1.call("GET", "/api/v1/keys/SAE_2/enc_keys"), 503)
        sae2 = Raw(pair, "SAE_2")  # the receiver side too
        error(sae2.call("GET", "/api/v1/keys/SAE_1/enc_keys"), 503)
    finally:
        pair.close()


@pytest.mark.parametrize("method, path, code", [
    ("GET", "/", 404), ("GET", "/api/v1/keys", 404), ("GET", "/api/v1/keys/SAE_2/other", 404),
    ("DELETE", "/api/v1/keys/SAE_2/enc_keys", 405), ("PUT", "/api/v1/keys/SAE_1/dec_keys", 405),
    ("POST", "/api/v1/keys/SAE_2/status", 405),
])
def test_http_errors_are_json_never_html(sae1: Raw, method: str, path: str, code: int) -> None:
    error(sae1.call(method, path), code)


def test_oversized_body_is_a_json_error(sae1: Raw) -> None:
    status, body = sae1.call("POST", "/api/v1/keys/SAE_2/enc_keys",
                             raw=b'{"x": "' + b"a" * 400_000 + b'"}')
    assert status == 413 and "message" in body
