"""Fuzzing of the KME's ETSI GS QKD 014 API, from its OpenAPI document (kme/openapi.yaml).

Requests go to KME_A of a live in-process pair (tests/harness.py), over mutual TLS,
as SAE_1. Two generators:

* schemathesis cases for every operation of the document, positive (fits the document)
  and negative (violates it). Path parameters are often real SAE IDs, and positive
  cases are often steered to in-bounds sizes and to key_IDs that really exist, so the
  handlers are reached and not only the "unknown SAE" check in front of them;
* raw hypothesis requests: arbitrary bytes and JSON values POSTed to enc_keys and
  dec_keys, arbitrary query strings on the GET forms.

Every answer must be either a 200 that validates against the document, or an error
(4xx, or 503 "no key") whose body is a JSON object with a non-empty string "message".
Never another 5xx, never a 422.
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, HookContext

import kme.server
from keyclient import Etsi014Client
from keyclient.errors import KMEError
from qgw.pki import Pki
from tests.harness import SAES, KmePair

DOCUMENT = Path(kme.server.__file__).with_name("openapi.yaml")
SCHEMA = schemathesis.openapi.from_path(DOCUMENT)

SAE_IDS = sorted(SAES)              # SAE_1 (the caller), SAE_4 (same KME), SAE_9 (unlinked KME)...
LINKED = ["SAE_2", "SAE_3"]         # ... and the two at KME_B, across the QKD link
PREFIX = "/api/v1/keys"
KEYS_PATH = {"enc_keys": PREFIX + "/{slave_SAE_ID}/enc_keys",
             "dec_keys": PREFIX + "/{master_SAE_ID}/dec_keys",
             "status": PREFIX + "/{slave_SAE_ID}/status"}
OPERATIONS = {
    "getStatus": SCHEMA[KEYS_PATH["status"]]["GET"],
    "getKey": SCHEMA[KEYS_PATH["enc_keys"]]["GET"],
    "postGetKey": SCHEMA[KEYS_PATH["enc_keys"]]["POST"],
    "getKeyWithKeyIDs": SCHEMA[KEYS_PATH["dec_keys"]]["GET"],
    "postGetKeyWithKeyIDs": SCHEMA[KEYS_PATH["dec_keys"]]["POST"],
}
RATE_BPS = 4e6  # fast enough that enc_keys is rarely refused for want of key
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")

# Bounded, deterministic, no deadline: a request over TLS to a KME that shares the CPU
# with the test has no meaningful time limit.
FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)


@SCHEMA.hook
def flatmap_path_parameters(context: HookContext, path_parameters: dict[str, Any]
                            ) -> st.SearchStrategy[dict[str, Any]]:
    """A third generated as the document says, a third any known SAE, a third a linked one."""
    names = list(path_parameters)
    if not names:
        return st.just(path_parameters)
    return st.one_of(
        st.just(path_parameters),
        st.sampled_from(SAE_IDS).map(lambda sae: dict.fromkeys(names, sae)),
        st.sampled_from(LINKED).map(lambda sae: dict.fromkeys(names, sae)),
    )


# -- what every answer must look like ---------------------------------------------------

def check_answer(operation: schemathesis.APIOperation, answer: Any) -> int:
    """Assert the invariants on one answer; returns its status."""
    response = schemathesis.Response.from_any(answer)
    status = response.status_code
    where = (f"{response.request.method} {response.request.url}\n"
             f"  body sent: {response.request.body!r:.300}\n"
             f"  answer: {status} {response.content[:300]!r}")
    assert status != 422, where
    assert status < 500 or status == 503, where
    assert status == 200 or status >= 400, where
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), where
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"answer is not JSON: {where}") from None
    if status == 200:
        operation.validate_response(response)
        if "keys" in body:  # KeyContainer: the validator checks format uuid, not format byte
            for key in body["keys"]:
                assert UUID_RE.match(key["key_ID"]), where
                assert base64.b64decode(key["key"], validate=True), where
    else:
        assert isinstance(body, dict), where
        assert isinstance(body.get("message"), str) and body["message"].strip(), where
    return status


def test_response_validation_is_not_vacuous() -> None:
    """The document's response schemas really are applied (format uuid too, not format byte)."""
    kid = "6d736135-d85f-4f5c-b8e9-11ddbe44d928"
    valid = OPERATIONS["getKey"].is_valid_response
    assert valid(_fake_answer(200, {"keys": [{"key_ID": kid, "key": "AA=="}]}))
    assert not valid(_fake_answer(200, {"keys": [{"key_ID": kid}]}))
    assert not valid(_fake_answer(200, {"keys": [{"key_ID": "not-a-uuid", "key": "AA=="}]}))
    assert not valid(_fake_answer(400, {"msg": "no message"}))
    assert not OPERATIONS["getStatus"].is_valid_response(_fake_answer(200, {"key_size": 256}))


def _fake_answer(status: int, body: Any) -> schemathesis.Response:
    return schemathesis.Response(
        status_code=status, headers={"Content-Type": ["application/json"]},
        content=json.dumps(body).encode(), elapsed=0.0, verify=True,
        request=requests.Request("GET", "https://localhost/x").prepare())


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[KmePair]:
    """One pair for the whole module: what is fuzzed is the answers, not the life cycle."""
    kmes = KmePair(tmp_path_factory.mktemp("fuzz"), pki, rate_bps=RATE_BPS).start()
    try:
        kmes.wait_for_keys()
        yield kmes
    finally:
        kmes.close()


class Sae1:
    """SAE_1's HTTPS session to KME_A (client certificate + the test CA); and SAE_2, its
    peer at KME_B, as a key client, to obtain key_IDs that SAE_1 can really fetch."""

    def __init__(self, kmes: KmePair) -> None:
        files = kmes.pki.sae_files("SAE_1")
        self.base_url = kmes.url("KME_A")
        self.tls: dict[str, Any] = {"verify": str(files.ca),
                                    "cert": (str(files.cert), str(files.key)),
                                    "timeout": 10}
        self.session = requests.Session()
        self.sae2 = Etsi014Client(kmes.url("KME_B"), kmes.pki.sae_files("SAE_2"), retries=0)

    def request(self, method: str, path: str, body: bytes | None = None) -> schemathesis.Response:
        """One raw request; the answer comes back detached from the connection."""
        with self.session.request(method, self.base_url + path, data=body,
                                  allow_redirects=False, **self.tls) as response:
            return schemathesis.Response.from_any(response)

    def key_ids_from_sae2(self, number: int) -> list[str]:
        return [k.key_id for k in self.sae2.get_keys("SAE_1", number=number)]

    def close(self) -> None:
        self.session.close()
        self.sae2.close()


@pytest.fixture
def sae1(pair: KmePair) -> Iterator[Sae1]:
    client = Sae1(pair)
    try:
        yield client
    finally:
        client.close()


# -- schemathesis: every operation of the document ---------------------------------------

def _steer(data: st.DataObject, op_id: str, case: schemathesis.Case, sae1: Sae1) -> None:
    """For positive cases: often in-bounds sizes, and key_IDs that really exist."""
    if op_id in ("getKey", "postGetKey") and data.draw(st.booleans(), label="in bounds"):
        bounds = {"number": data.draw(st.integers(1, 4), label="number"),
                  "size": data.draw(st.sampled_from([64, 256, 1024, 8192]), label="size")}
        if op_id == "getKey":
            case.query = {k: v for k, v in bounds.items() if data.draw(st.booleans())}
        elif isinstance(case.body, dict):
            case.body.update(bounds)
            case.body.pop("extension_mandatory", None)
            extra = data.draw(st.lists(st.sampled_from(SAE_IDS), max_size=2, unique=True),
                              label="additional slaves")
            if extra:
                case.body["additional_slave_SAE_IDs"] = extra
            else:
                case.body.pop("additional_slave_SAE_IDs", None)
    if op_id in ("getKeyWithKeyIDs", "postGetKeyWithKeyIDs") and data.draw(st.booleans(),
                                                                          label="real key"):
        number = 1 if op_id == "getKeyWithKeyIDs" else data.draw(st.integers(1, 3), label="n")
        try:
            ids = sae1.key_ids_from_sae2(number)
        except KMEError:  # no key on the link just now: keep the generated key_IDs
            return
        if data.draw(st.booleans(), label="upper case"):
            ids = [k.upper() for k in ids]
        if data.draw(st.booleans(), label="right master"):
            case.path_parameters["master_SAE_ID"] = "SAE_2"
        if op_id == "getKeyWithKeyIDs":
            case.query = {**(case.query or {}), "key_ID": ids[0]}
        elif isinstance(case.body, dict):
            case.body["key_IDs"] = [{"key_ID": k} for k in ids]


OPERATION_CASES = [
    pytest.param(op_id, mode, id=f"{op_id}-{mode.value}")
    for op_id in OPERATIONS for mode in GenerationMode
    # getStatus's only parameter is a path string: nothing there to violate.
    if not (op_id == "getStatus" and mode is GenerationMode.NEGATIVE)
]


@pytest.mark.parametrize("op_id, mode", OPERATION_CASES)
def test_operation_fuzz(sae1: Sae1, op_id: str, mode: GenerationMode) -> None:
    operation = OPERATIONS[op_id]
    strategy = operation.as_strategy(mode)
    seen: Counter[int] = Counter()

    # Negative cases are costlier to generate and nearly all end in the same 400s.
    @settings(FUZZ, max_examples=60 if mode is GenerationMode.POSITIVE else 40)
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        case = data.draw(strategy, label="case")
        if mode is GenerationMode.POSITIVE:
            _steer(data, op_id, case, sae1)
        response = case.call(base_url=sae1.base_url, session=sae1.session, **sae1.tls)
        seen[check_answer(operation, response)] += 1

    fuzz()
    # The steering above must have let the handlers answer, not only the SAE check.
    if mode is GenerationMode.POSITIVE:
        assert seen[200] > 0, seen


# -- raw hypothesis: arbitrary bytes, JSON values, query strings --------------------------

SAE_IN_PATH = st.one_of(st.sampled_from(SAE_IDS), st.sampled_from(LINKED),
                        st.text(min_size=1, max_size=12)).map(lambda s: quote(s, safe=""))
FIELDS = ["number", "size", "additional_slave_SAE_IDs", "extension_mandatory",
          "extension_optional", "key_IDs", "key_ID", "key_IDs_extension", "key_ID_extension"]
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
    | st.sampled_from(SAE_IDS),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
JSON_OBJECT = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON_VALUE,
                              max_size=5)
KEY_IDS_BODY = st.fixed_dictionaries(
    {"key_IDs": st.lists(st.fixed_dictionaries({"key_ID": st.uuids().map(str) | JSON_VALUE}),
                         max_size=3)},
    optional={"key_IDs_extension": JSON_VALUE})
RAW_BODY = st.one_of(
    st.binary(max_size=300),
    st.one_of(JSON_VALUE, JSON_OBJECT, KEY_IDS_BODY).flatmap(
        lambda value: st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]).map(
            lambda codec: json.dumps(value).encode(codec))),
)
QUERY_VALUE = st.one_of(st.integers(-10, 10_000).map(str), st.uuids().map(str),
                        st.sampled_from(["", "1", "8", "64", "256", "8192", "1.5", "1e3"]),
                        st.text(max_size=10))
QUERY = st.one_of(
    st.text(max_size=40),
    st.lists(st.tuples(st.sampled_from(["number", "size", "key_ID"]) | st.text(max_size=6),
                       QUERY_VALUE), max_size=4).map(
        lambda pairs: "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)),
)
RAW = settings(FUZZ, max_examples=100)


@pytest.mark.parametrize("name", ["enc_keys", "dec_keys"])
def test_raw_bodies(sae1: Sae1, name: str) -> None:
    operation = OPERATIONS["postGetKey" if name == "enc_keys" else "postGetKeyWithKeyIDs"]
    seen: Counter[int] = Counter()

    @RAW
    @given(sae=SAE_IN_PATH, body=RAW_BODY)
    def fuzz(sae: str, body: bytes) -> None:
        response = sae1.request("POST", f"{PREFIX}/{sae}/{name}", body)
        seen[check_answer(operation, response)] += 1

    fuzz()
    assert seen[400] > 0, seen
    if name == "enc_keys":  # a JSON object without the known fields asks for the defaults
        assert seen[200] > 0, seen


@pytest.mark.parametrize("name", ["status", "enc_keys", "dec_keys"])
def test_raw_query_strings(sae1: Sae1, name: str) -> None:
    operation = SCHEMA[KEYS_PATH[name]]["GET"]
    seen: Counter[int] = Counter()

    @RAW
    @given(sae=SAE_IN_PATH, query=QUERY)
    def fuzz(sae: str, query: str) -> None:
        response = sae1.request("GET", f"{PREFIX}/{sae}/{name}?{query}")
        seen[check_answer(operation, response)] += 1

    fuzz()
    assert seen[400] > 0, seen
    if name != "dec_keys":  # no generated key_ID can name a real key
        assert seen[200] > 0, seen


# -- what the fuzzing found (fixed; kept as regressions) -----------------------------------

@pytest.mark.parametrize("name", ["enc_keys", "dec_keys"])
def test_deeply_nested_json_body(sae1: Sae1, name: str) -> None:
    depth = 10_000  # 20 kB, far under the 256 KiB body limit
    response = sae1.request("POST", f"{PREFIX}/SAE_2/{name}", b"[" * depth + b"]" * depth)
    check_answer(SCHEMA[KEYS_PATH[name]]["POST"], response)


def test_served_document_is_the_file(sae1: Sae1) -> None:
    response = sae1.request("GET", "/api/v1/openapi.json")
    assert response.status_code == 200, response.content[:300]
    assert json.loads(response.content) == yaml.safe_load(DOCUMENT.read_text())


@pytest.mark.parametrize("query", ["number=1%0A", "size=256%0A", "number=%2B1"])
def test_integers_with_trailing_newline_or_sign_are_refused(sae1: Sae1, query: str) -> None:
    response = sae1.request("GET", f"{PREFIX}/SAE_2/enc_keys?{query}", None)
    assert response.status_code == 400, response.content
