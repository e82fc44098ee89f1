"""SKIP (draft-cisco-skip) key provider of the KME simulator: fields, key life cycle, errors.

Raw HTTPS (urllib3 with the SAE's certificate), so the tests see exactly what goes
over the wire. SAE_1 (at KME_A) is the initiator, SAE_2 (at KME_B) the responder.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import urllib3

import kme.server
from qgw.pki import Pki
from qgw.tls import client_context
from tests.harness import KmePair
from tests.kme.raw import Raw, error

HEX32 = re.compile(r"^[0-9a-f]{32}\Z")
HEX = re.compile(r"^(?:[0-9a-f]{2})+\Z")
ANY_ID = "0123456789abcdef0123456789abcdef"
CAPABILITY_FIELDS = {"entropy", "key", "algorithm", "localSystemID", "remoteSystemID"}
DOCUMENT = schemathesis.openapi.from_path(Path(kme.server.__file__).with_name("openapi.yaml"))


def documented(path: str, status: int, body: Any) -> None:
    """The answer fits the SKIP section of kme/openapi.yaml."""
    answer = schemathesis.Response(
        status_code=status, headers={"Content-Type": ["application/json"]},
        content=json.dumps(body).encode(), elapsed=0.0, verify=True,
        request=requests.Request("GET", "https://localhost" + path).prepare())
    DOCUMENT[path]["GET"].validate_response(answer)


def new_key(sae: Raw, remote: str = "SAE_2", query: str = "") -> tuple[str, str]:
    status, body = sae.call("GET", f"/key?remoteSystemID={remote}{query}")
    assert status == 200, body
    assert set(body) == {"keyId", "key"}
    assert HEX32.match(body["keyId"]) and HEX.match(body["key"])
    return body["keyId"], body["key"]


# -- capabilities ------------------------------------------------------------------------

def test_capabilities_name_the_caller_and_the_remote_encryptors(sae1: Raw, sae2: Raw) -> None:
    status, body = sae1.call("GET", "/capabilities")
    assert status == 200 and set(body) == CAPABILITY_FIELDS
    assert body["entropy"] is True and body["key"] is True
    assert body["localSystemID"] == "SAE_1"
    # SAEs of other KMEs only: not SAE_1 itself, not SAE_4 at the same KME.
    assert body["remoteSystemID"] == ["SAE_2", "SAE_3", "SAE_9"]
    assert isinstance(body["algorithm"], str) and body["algorithm"].startswith("TLS")
    documented("/capabilities", status, body)
    status, body = sae2.call("GET", "/capabilities")
    assert status == 200 and body["localSystemID"] == "SAE_2"
    assert body["remoteSystemID"] == ["SAE_1", "SAE_4", "SAE_9"]


def test_document_is_served_with_the_skip_paths(sae1: Raw) -> None:
    status, doc = sae1.call("GET", "/api/v1/openapi.json")
    assert status == 200
    assert {"/capabilities", "/key", "/key/{keyId}", "/entropy"} <= set(doc["paths"])
    assert "PSK" in doc["paths"]["/capabilities"]["get"]["description"]


# -- the key life cycle ------------------------------------------------------------------

def test_initiator_and_responder_get_the_same_key_once(sae1: Raw, sae2: Raw) -> None:
    key_id, key = new_key(sae1)
    assert len(key) == 64  # the KME's default key_size, 256 bits
    documented("/key", 200, {"keyId": key_id, "key": key})
    status, body = sae2.call("GET", f"/key/{key_id}?remoteSystemID=SAE_1")
    assert status == 200 and body == {"keyId": key_id, "key": key}
    documented("/key/{keyId}", status, body)
    # Deleted once fetched.
    msg = error(sae2.call("GET", f"/key/{key_id}?remoteSystemID=SAE_1"), 400)
    assert key_id in msg


def test_every_key_is_new(sae1: Raw) -> None:
    (id1, k1), (id2, k2) = new_key(sae1), new_key(sae1)
    assert id1 != id2 and k1 != k2


@pytest.mark.parametrize("bits", [64, 128, 512, 8192])
def test_key_size_is_in_bits(sae1: Raw, sae2: Raw, bits: int) -> None:
    key_id, key = new_key(sae1, query=f"&size={bits}")
    assert len(key) * 4 == bits
    status, body = sae2.call("GET", f"/key/{key_id}?remoteSystemID=SAE_1")
    assert status == 200 and body["key"] == key


@pytest.mark.parametrize("size", ["0", "-8", "abc", "100", "56", "8200", "", "1e3", "256%0A",
                                  "256&size=256"])
def test_bad_size_is_400(sae1: Raw, size: str) -> None:
    msg = error(sae1.call("GET", f"/key?remoteSystemID=SAE_2&size={size}"), 400)
    assert "size" in msg


def test_uppercase_key_id_is_the_same_key(sae1: Raw, sae2: Raw) -> None:
    key_id, key = new_key(sae1)
    status, body = sae2.call("GET", f"/key/{key_id.upper()}?remoteSystemID=SAE_1")
    assert status == 200 and body == {"keyId": key_id, "key": key}


@pytest.mark.parametrize("key_id", [
    "xyz", "0" * 31, "0" * 33, "g" * 32, str(uuid.UUID(ANY_ID)), f"%7B{ANY_ID}%7D",
    f"urn:uuid:{ANY_ID}", f"%20{ANY_ID}", f"{ANY_ID}%0A", f"0x{ANY_ID[2:]}",
])
def test_malformed_key_id_is_400(sae2: Raw, key_id: str) -> None:
    msg = error(sae2.call("GET", f"/key/{key_id}?remoteSystemID=SAE_1"), 400)
    assert "keyId" in msg


def test_unknown_key_id_is_400(sae2: Raw) -> None:
    key_id = uuid.uuid4().hex
    msg = error(sae2.call("GET", f"/key/{key_id}?remoteSystemID=SAE_1"), 400)
    assert f"unknown keyId {key_id}" in msg


def test_only_the_named_pair_gets_the_key(kmes: KmePair, sae1: Raw, sae2: Raw) -> None:
    key_id, key = new_key(sae1)
    sae3 = Raw(kmes, "SAE_3")  # at KME_B as well, but not the key's responder
    msg = error(sae3.call("GET", f"/key/{key_id}?remoteSystemID=SAE_1"), 400)
    assert "SAE_3" in msg
    error(sae2.call("GET", f"/key/{key_id}?remoteSystemID=SAE_4"), 400)  # wrong initiator named
    # Neither attempt used the key up.
    status, body = sae2.call("GET", f"/key/{key_id}?remoteSystemID=SAE_1")
    assert status == 200 and body["key"] == key


def test_initiator_cannot_fetch_its_key_by_id(sae1: Raw) -> None:
    key_id, _ = new_key(sae1)
    error(sae1.call("GET", f"/key/{key_id}?remoteSystemID=SAE_2"), 400)


@pytest.mark.parametrize("query, fragment", [
    ("remoteSystemID=SAE_404", "unknown"), ("", "required"), ("remoteSystemID=", "required"),
    ("remotesystemid=SAE_2", "required"), ("remoteSystemID=SAE_1", "this KME"),
    ("remoteSystemID=SAE_4", "this KME"),
    ("remoteSystemID=SAE_2&remoteSystemID=SAE_3", "more than once"),
])
def test_bad_remote_system_id_is_400(sae1: Raw, query: str, fragment: str) -> None:
    msg = error(sae1.call("GET", f"/key?{query}"), 400)
    assert fragment in msg and "remoteSystemID" in msg
    msg = error(sae1.call("GET", f"/key/{uuid.uuid4().hex}?{query}"), 400)
    assert fragment in msg


# -- no key ------------------------------------------------------------------------------

def test_kme_without_a_path_to_the_remote_answers_503(sae1: Raw) -> None:
    msg = error(sae1.call("GET", "/key?remoteSystemID=SAE_9"), 503)  # KME_C: no link, no relay
    assert "KME_C" in msg


def test_link_without_key_answers_503(tmp_path: Path, pki: Pki) -> None:
    pair = KmePair(tmp_path, pki, rate_bps=0).start()
    try:
        for sae, remote in (("SAE_1", "SAE_2"), ("SAE_2", "SAE_1")):  # both ends of the link
            msg = error(Raw(pair, sae).call("GET", f"/key?remoteSystemID={remote}"), 503)
            assert "key" in msg
    finally:
        pair.close()


def test_more_than_the_link_holds_is_503_and_takes_nothing(tmp_path: Path, pki: Pki) -> None:
    pair = KmePair(tmp_path, pki, limits={"store_capacity_bits": 4 * 256}).start()
    try:
        pair.wait_for_keys(4)
        sae1, sae2 = Raw(pair, "SAE_1"), Raw(pair, "SAE_2")
        status, body = sae1.call("GET", "/key?remoteSystemID=SAE_2&size=2048")
        error((status, body), 503)
        (details,) = body["details"]
        assert details["requested_bits"] == 2048 and details["available_bits"] < 2048
        # The refused request took nothing: the whole store still makes four keys.
        for _ in range(4):
            key_id, key = new_key(sae1)
            status, body = sae2.call("GET", f"/key/{key_id}?remoteSystemID=SAE_1")
            assert status == 200 and body["key"] == key
    finally:
        pair.close()


# -- entropy ---------------------------------------------------------------------------

@pytest.mark.parametrize("query, bits", [("", 256), ("?minentropy=8", 8),
                                         ("?minentropy=128", 128), ("?minentropy=8192", 8192)])
def test_entropy_has_the_asked_length(sae1: Raw, query: str, bits: int) -> None:
    status, body = sae1.call("GET", "/entropy" + query)
    assert status == 200 and set(body) == {"randomStr", "minentropy"}
    assert body["minentropy"] == bits
    assert HEX.match(body["randomStr"]) and len(body["randomStr"]) * 4 == bits
    documented("/entropy", status, body)


def test_entropy_is_fresh(sae2: Raw) -> None:
    answers = {sae2.call("GET", "/entropy")[1]["randomStr"] for _ in range(3)}
    assert len(answers) == 3


@pytest.mark.parametrize("value", ["0", "7", "12", "-8", "abc", "", "8200", "100000000"])
def test_bad_minentropy_is_400(sae1: Raw, value: str) -> None:
    msg = error(sae1.call("GET", f"/entropy?minentropy={value}"), 400)
    assert "minentropy" in msg


# -- HTTP methods ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/capabilities", "/key?remoteSystemID=SAE_2",
                                  f"/key/{ANY_ID}?remoteSystemID=SAE_1", "/entropy"])
def test_other_methods_are_405(sae1: Raw, method: str, path: str) -> None:
    r = sae1.pool.urlopen(method, path, body=b"{}")
    assert r.status == 405 and r.headers.get("Allow") == "GET"
    assert json.loads(r.data)["message"]


def test_head_is_405_and_makes_no_key(kmes: KmePair, sae1: Raw) -> None:
    async def reserved_at_b() -> int:
        return kmes.servers["KME_B"].kme.store.reserved_key_count()

    before = kmes.loop.run(reserved_at_b())
    r = sae1.pool.urlopen("HEAD", "/key?remoteSystemID=SAE_2")
    assert r.status == 405
    assert kmes.loop.run(reserved_at_b()) == before
    new_key(sae1)  # whereas a GET reserves one for the responder
    assert kmes.loop.run(reserved_at_b()) == before + 1


# -- who may call ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/capabilities", "/key?remoteSystemID=SAE_2",
                                  f"/key/{ANY_ID}?remoteSystemID=SAE_2",
                                  "/entropy"])
def test_certificate_that_is_not_this_kmes_sae_gets_401(kmes: KmePair, pki: Pki,
                                                         path: str) -> None:
    kme_cert = Raw(kmes, "KME_B", kme="KME_A", ctx=client_context(pki.kme_files("KME_B")))
    error(kme_cert.call("GET", path), 401)
    other_sae = Raw(kmes, "SAE_2", kme="KME_A")  # a valid SAE certificate, of KME_B
    assert "SAE_2" in error(other_sae.call("GET", path), 401)


def test_certificate_from_another_ca_fails_the_handshake(kmes: KmePair,
                                                         foreign_pki: Pki) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(kmes.pki.ca_cert))
    files = foreign_pki.sae_files("SAE_1")
    ctx.load_cert_chain(str(files.cert), str(files.key))
    intruder = Raw(kmes, "SAE_1", ctx=ctx)
    with pytest.raises((urllib3.exceptions.SSLError, urllib3.exceptions.ProtocolError)):
        intruder.call("GET", "/capabilities")


# -- secrecy -----------------------------------------------------------------------------

def test_keys_never_reach_logs_or_errors(sae1: Raw, sae2: Raw,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key_id, key = new_key(sae1)
    _, random = sae1.call("GET", "/entropy")
    status, _ = sae2.call("GET", f"/key/{key_id}?remoteSystemID=SAE_1")
    assert status == 200
    errors = [sae2.call("GET", f"/key/{key_id}?remoteSystemID=SAE_1"),
              sae2.call("GET", f"/key/{key_id}?remoteSystemID=SAE_4"),
              sae1.call("GET", f"/key/{key_id}?remoteSystemID=SAE_2")]
    assert key_id in caplog.text  # the KME's log lines do reach the check
    material = bytes.fromhex(key)
    for secret in (key, key.upper(), random["randomStr"], repr(material),
                   material.hex(" "), str(list(material))):
        assert secret not in caplog.text
        for _, body in errors:
            assert secret not in json.dumps(body)
