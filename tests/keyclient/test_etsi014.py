"""`keyclient.Etsi014Client` against real KMEs over mutual TLS.

Parsing into `KmeStatus`/`Key`, the typed error tree (with retries only where a retry can
help), trust that nothing in the environment can change, key bytes that never show, and
one TLS connection for many calls. Connections are counted by a TCP relay the client is
pointed at (TLS stays end to end through it); requests by the KME's own metrics.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp import web

from keyclient import (
    Etsi014Client,
    Key,
    KMEBadRequest,
    KMEError,
    KmeStatus,
    KMEUnauthorized,
    KMEUnavailable,
    KMEUnreachable,
)
from keyclient.errors import KMEAnswerLost
from qgw.pki import Pki
from qgw.secret import Secret
from qgw.tls import client_context, server_context
from tests.harness import KmePair, Loop

# -- helpers -------------------------------------------------------------------------------


class CountingRelay:
    """A TCP relay to a local port that counts the connections it accepts."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"  # KME certificates name 127.0.0.1
        self.accepted = 0
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._start(self._accept)

    def _start(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self.accepted += 1
                self._socks += [conn, upstream]
            self._start(_pump, conn, upstream)
            self._start(_pump, upstream, conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout=5)
        for s in socks:
            s.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def relay(kmes: KmePair, kme: str = "KME_A") -> CountingRelay:
    r = CountingRelay(kmes.ports[kme])
    kmes.on_close(r.close)  # after the clients, before the KMEs
    return r


def requests_seen(kmes: KmePair, kme: str, call: str, code: int) -> int:
    value = kmes.servers[kme].kme.metrics.registry.get_sample_value(
        "qgw_kme_requests_total", {"call": call, "code": str(code)})
    return int(value or 0)


def renderings(secret: bytes) -> list[str]:
    """Every way key bytes could show up in text."""
    b64 = base64.b64encode(secret).decode()
    return [b64, b64.rstrip("="), base64.urlsafe_b64encode(secret).decode().rstrip("="),
            secret.hex(), secret.hex().upper(), repr(secret)[2:-1], str(list(secret))[1:-1]]


def assert_no_key_bytes(texts: list[str], secrets: list[bytes]) -> None:
    for secret in secrets:
        for leak in renderings(secret):
            for text in texts:
                assert leak not in text, f"key bytes in {text!r}"


def error_texts(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), *(str(a) for a in exc.args),
            "".join(traceback.format_exception(exc))]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[KmePair]:
    """KME_A and KME_B for the tests that leave both running (function-scoped `kmes` else)."""
    kmes = KmePair(tmp_path_factory.mktemp("kmes"), pki).start()
    try:
        kmes.wait_for_keys()
        yield kmes
    finally:
        kmes.close()


@pytest.fixture
def foreign_kme(tmp_path: Path, foreign_pki: Pki) -> Iterator[KmePair]:
    """KME_A with a certificate of another CA (same names), at its own port."""
    pair = KmePair(tmp_path / "foreign", foreign_pki).start("KME_A")
    try:
        yield pair
    finally:
        pair.close()


# -- the three calls --------------------------------------------------------------------------

def test_status_is_parsed_into_kme_status(pair: KmePair) -> None:
    st = pair.client("SAE_1").status("SAE_2")
    assert isinstance(st, KmeStatus)
    assert (st.source_KME_ID, st.target_KME_ID) == ("KME_A", "KME_B")
    assert (st.master_SAE_ID, st.slave_SAE_ID) == ("SAE_1", "SAE_2")
    assert (st.key_size, st.min_key_size, st.max_key_size) == (256, 64, 8192)
    assert st.max_key_per_request == 128 and st.max_SAE_ID_count == 8
    assert st.max_key_count == 8 * 1024 * 1024 // 256
    assert 8 <= st.stored_key_count <= st.max_key_count
    assert isinstance(st.status_extension, dict) and st.status_extension
    other = pair.client("SAE_2").status("SAE_1")
    assert (other.source_KME_ID, other.target_KME_ID) == ("KME_B", "KME_A")


def test_get_keys_and_get_keys_with_ids_give_the_same_secrets(pair: KmePair) -> None:
    master, slave = pair.client("SAE_1"), pair.client("SAE_2")
    keys = master.get_keys("SAE_2", number=3, size=512)
    assert len(keys) == 3 and all(isinstance(k, Key) and k.bits == 512 for k in keys)
    assert len({k.key_id for k in keys}) == 3
    assert all(str(uuid.UUID(k.key_id)) == k.key_id for k in keys)
    # Ask for them out of order and in upper case: the answer follows the request.
    wanted = [keys[2].key_id.upper(), keys[0].key_id, keys[1].key_id]
    got = slave.get_keys_with_ids("SAE_1", wanted)
    assert [k.key_id for k in got] == [keys[2].key_id, keys[0].key_id, keys[1].key_id]
    assert [k.secret for k in got] == [keys[2].secret, keys[0].secret, keys[1].secret]
    assert got[0].secret.expose() == keys[2].secret.expose()
    assert len({k.secret.expose() for k in keys}) == 3  # three different keys


def test_get_keys_default_size(pair: KmePair) -> None:
    (key,) = pair.client("SAE_1").get_keys("SAE_2")
    assert key.bits == 256


def test_multicast_with_additional_slaves(pair: KmePair) -> None:
    (key,) = pair.client("SAE_1").get_keys("SAE_2", additional_slave_sae_ids=["SAE_3"])
    for sae in ("SAE_2", "SAE_3"):
        (got,) = pair.client(sae).get_keys_with_ids("SAE_1", [key.key_id])
        assert got.key_id == key.key_id and got.secret == key.secret
    with pytest.raises(KMEBadRequest):  # each slave once
        pair.client("SAE_3").get_keys_with_ids("SAE_1", [key.key_id])


# -- the error tree ---------------------------------------------------------------------------

def test_400_is_bad_request_with_the_kme_message(pair: KmePair) -> None:
    client = pair.client("SAE_1")
    before = requests_seen(pair, "KME_A", "enc_keys_post", 400)
    with pytest.raises(KMEBadRequest) as info:
        client.get_keys("SAE_404")
    err = info.value
    assert err.status == 400 and err.url == pair.url("KME_A")
    assert "SAE_404" in err.message and "unknown" in err.message  # what the KME said
    assert err.message in str(err) and "HTTP 400" in str(err)
    with pytest.raises(KMEBadRequest, match="size"):
        client.get_keys("SAE_2", size=100)
    with pytest.raises(KMEBadRequest, match="twice"):
        client.get_keys("SAE_2", additional_slave_sae_ids=["SAE_3", "SAE_3"])
    assert requests_seen(pair, "KME_A", "enc_keys_post", 400) == before + 3  # none retried


def test_400_for_an_unknown_or_delivered_key_id(pair: KmePair) -> None:
    (key,) = pair.client("SAE_1").get_keys("SAE_2")
    slave = pair.client("SAE_2")
    with pytest.raises(KMEBadRequest, match="unknown key_ID"):
        slave.get_keys_with_ids("SAE_1", [str(uuid.uuid4())])
    slave.get_keys_with_ids("SAE_1", [key.key_id])
    with pytest.raises(KMEBadRequest) as info:
        slave.get_keys_with_ids("SAE_1", [key.key_id])
    assert key.key_id in info.value.message


def test_401_is_unauthorized(pair: KmePair, pki: Pki) -> None:
    (key,) = pair.client("SAE_1").get_keys("SAE_2")
    before = requests_seen(pair, "KME_B", "dec_keys_post", 401)
    with pytest.raises(KMEUnauthorized) as info:
        pair.client("SAE_3").get_keys_with_ids("SAE_1", [key.key_id])
    assert info.value.status == 401 and "SAE_3" in info.value.message
    # A valid SAE certificate at a KME it is not attached to.
    with Etsi014Client(pair.url("KME_A"), pki.sae_files("SAE_2")) as intruder, \
            pytest.raises(KMEUnauthorized, match="SAE_2"):
        intruder.get_keys("SAE_1")
    assert requests_seen(pair, "KME_B", "dec_keys_post", 401) == before + 1  # not retried
    # The refused requests took nothing.
    (got,) = pair.client("SAE_2").get_keys_with_ids("SAE_1", [key.key_id])
    assert got.secret == key.secret


@pytest.mark.parametrize("pair_args, number", [
    ({"rate_bps": 0}, 1),                                   # a link with no key at all
    ({"limits": {"store_capacity_bits": 4 * 256}}, 5),      # more than the link can hold
], ids=["zero-rate", "exhausted"])
def test_503_is_unavailable_after_bounded_retries(
        tmp_path: Path, pki: Pki, pair_args: dict[str, Any], number: int) -> None:
    pair = KmePair(tmp_path, pki, **pair_args).start()
    try:
        client = pair.client("SAE_1", retries=2, backoff_s=0.1)
        started = time.monotonic()
        with pytest.raises(KMEUnavailable) as info:
            client.get_keys("SAE_2", number=number)
        elapsed = time.monotonic() - started
        assert type(info.value) is KMEUnavailable  # an answer, not "unreachable"
        assert info.value.status == 503 and "key" in info.value.message
        assert requests_seen(pair, "KME_A", "enc_keys_post", 503) == 3  # 1 + 2 retries
        # Backoff 0.1 s then 0.2 s, each with a jitter of 0.5 to 1.5.
        assert 0.15 <= elapsed < 2.0
        # retries=0: exactly one request.
        once = pair.client("SAE_1", retries=0, backoff_s=5.0)
        started = time.monotonic()
        with pytest.raises(KMEUnavailable):
            once.get_keys("SAE_2", number=number)
        assert time.monotonic() - started < 1.0
        assert requests_seen(pair, "KME_A", "enc_keys_post", 503) == 4
    finally:
        pair.close()


def test_peer_kme_down_is_unavailable_not_unreachable(kmes: KmePair) -> None:
    kmes.stop("KME_B")
    client = kmes.client("SAE_1", retries=0)
    with pytest.raises(KMEUnavailable) as info:
        client.get_keys("SAE_2")
    assert type(info.value) is KMEUnavailable and info.value.status == 503
    assert "KME_B" in info.value.message


def test_kme_down_is_unreachable_quickly(kmes: KmePair) -> None:
    client = kmes.client("SAE_1", retries=2, backoff_s=0.01)
    assert client.status("SAE_2").stored_key_count >= 0  # a pooled connection exists
    kmes.stop("KME_A")
    started = time.monotonic()
    with pytest.raises(KMEUnreachable) as info:
        client.get_keys("SAE_2")
    assert time.monotonic() - started < 1.0
    err = info.value
    assert err.status is None and "connection refused" in err.message
    assert err.url == kmes.url("KME_A") and "no answer" in str(err)
    assert isinstance(err, KMEUnavailable)  # callers that wait for key treat both alike


def test_client_recovers_when_the_kme_comes_back(kmes: KmePair) -> None:
    client = kmes.client("SAE_1", retries=0)
    client.status("SAE_2")
    kmes.stop("KME_A")
    with pytest.raises(KMEUnreachable):
        client.status("SAE_2")
    kmes.start("KME_A")
    assert client.status("SAE_2").source_KME_ID == "KME_A"


def test_server_certificate_of_another_ca_is_unreachable_without_retry(
        pki: Pki, foreign_kme: KmePair) -> None:
    through = relay(foreign_kme, "KME_A")
    with Etsi014Client(through.url, pki.sae_files("SAE_1"), retries=3, backoff_s=1.0) as client:
        started = time.monotonic()
        with pytest.raises(KMEUnreachable) as info:
            client.status("SAE_2")
        assert time.monotonic() - started < 0.5  # a retry would have slept >= 0.5 s
    assert through.accepted == 1
    assert "certificate" in info.value.message and info.value.status is None
    assert "TLS" in str(info.value)


def test_environment_cannot_change_whom_the_client_trusts(
        pair: KmePair, foreign_kme: KmePair, foreign_pki: Pki,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Each of these would make requests (or OpenSSL defaults) trust the foreign CA, or
    # send the calls through a proxy that does not exist.
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, str(foreign_pki.ca_cert))
    monkeypatch.setenv("SSL_CERT_DIR", str(foreign_pki.root))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    ours = Etsi014Client(pair.url("KME_A"), pair.pki.sae_files("SAE_1"), retries=0)
    theirs = Etsi014Client(foreign_kme.url("KME_A"), pair.pki.sae_files("SAE_1"), retries=0)
    with ours, theirs:
        assert ours.status("SAE_2").source_KME_ID == "KME_A"
        (key,) = ours.get_keys("SAE_2")
        assert key.bits == 256
        with pytest.raises(KMEUnreachable, match="certificate"):
            theirs.status("SAE_2")


# -- key bytes never show ---------------------------------------------------------------------

def test_key_repr_shows_only_its_size(pair: KmePair) -> None:
    keys = pair.client("SAE_1").get_keys("SAE_2", number=2)
    secrets = [k.secret.expose() for k in keys]
    key = keys[0]
    assert "<SECRET 256 bits>" in repr(key) and key.key_id in repr(key)
    assert repr(key.secret) == str(key.secret) == "<SECRET 256 bits>"
    assert_no_key_bytes([repr(key), str(key), repr(keys), f"{keys}", repr(key.secret)], secrets)


def test_no_error_carries_key_bytes(pair: KmePair) -> None:
    master, slave = pair.client("SAE_1"), pair.client("SAE_2")
    keys = master.get_keys("SAE_2", number=2)
    secrets = [k.secret.expose() for k in keys]
    ids = [k.key_id for k in keys]
    errors: list[KMEError] = []
    attempts = [
        lambda: pair.client("SAE_3").get_keys_with_ids("SAE_1", ids),      # 401
        lambda: slave.get_keys_with_ids("SAE_4", ids),                       # 401
        lambda: slave.get_keys_with_ids("SAE_1", [*ids, str(uuid.uuid4())]),  # 400
        lambda: slave.get_keys_with_ids("SAE_1", [ids[0], ids[0]]),          # 400
        lambda: master.get_keys_with_ids("SAE_2", ids),                      # 400
    ]
    for attempt in attempts:
        with pytest.raises(KMEError) as info:
            attempt()
        errors.append(info.value)
    slave.get_keys_with_ids("SAE_1", ids)
    with pytest.raises(KMEBadRequest) as info:
        slave.get_keys_with_ids("SAE_1", ids)  # already delivered
    errors.append(info.value)
    assert {e.status for e in errors} == {400, 401}
    assert_no_key_bytes([t for e in errors for t in error_texts(e)], secrets)


# -- answers a real KME never gives -----------------------------------------------------------

LEAK = bytes(range(200, 232))
LEAK_B64 = base64.b64encode(LEAK).decode()
ID = str(uuid.uuid4())


class BrokenKme:
    """A TLS server with a real KME certificate whose answers break the protocol.

    The product's KME cannot be made to answer like this; the client must still turn each
    answer into a KMEError, without the key bytes the answer carried.
    """

    ANSWERS: ClassVar[dict[str, tuple[int, bytes, str]]] = {
        "two_keys": (200, f'{{"keys": [{{"key_ID": "{ID}", "key": "{LEAK_B64}"}}, '
                          f'{{"key_ID": "{uuid.uuid4()}", "key": "{LEAK_B64}"}}]}}'.encode(),
                     "application/json"),
        "no_key_id": (200, f'{{"keys": [{{"key": "{LEAK_B64}"}}]}}'.encode(), "application/json"),
        "bad_base64": (200, f'{{"keys": [{{"key_ID": "{ID}", "key": "{LEAK.hex()}!"}}]}}'
                       .encode(), "application/json"),
        "other_id": (200, f'{{"keys": [{{"key_ID": "{uuid.uuid4()}", "key": "{LEAK_B64}"}}]}}'
                     .encode(), "application/json"),
        "not_json": (200, b"<html>" + LEAK_B64.encode() + b"</html>", "text/html"),
        "json_list": (200, f'["{LEAK_B64}"]'.encode(), "application/json"),
        "status_lacks_fields": (200, b'{"source_KME_ID": "KME_A"}', "application/json"),
        "html_400": (400, b"<html>bad request</html>", "text/html"),
        "error_500": (500, b'{"message": "internal KME error"}', "application/json"),
        "error_503_html": (503, b"<html>busy</html>", "text/html"),
    }

    def __init__(self, pki: Pki) -> None:
        self.loop = Loop()
        self.hits: dict[str, int] = {}
        app = web.Application()
        app.router.add_route("*", "/api/v1/keys/{sae}/{call}", self._answer)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.loop.run(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0,
                           ssl_context=server_context(pki.kme_files("KME_A")))
        self.loop.run(site.start())
        self.url = f"https://localhost:{self.runner.addresses[0][1]}"

    async def _answer(self, request: web.Request) -> web.Response:
        name = request.match_info["sae"]
        self.hits[name] = self.hits.get(name, 0) + 1
        status, body, ctype = self.ANSWERS[name]
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})

    def close(self) -> None:
        self.loop.run(self.runner.cleanup())
        self.loop.close()


@pytest.fixture(scope="module")
def broken_kme(pki: Pki) -> Iterator[BrokenKme]:
    server = BrokenKme(pki)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("answer, call, error, fragment", [
    ("two_keys", "enc", KMEError, "asked for 1 keys, got 2"),
    ("no_key_id", "enc", KMEError, "malformed key container"),
    ("bad_base64", "enc", KMEError, "malformed key container"),
    ("other_id", "dec", KMEError, "does not hold the requested key_IDs"),
    ("not_json", "enc", KMEError, "not a JSON object"),
    ("json_list", "enc", KMEError, "not a JSON object"),
    ("status_lacks_fields", "status", KMEError, "lacks ETSI fields"),
    ("html_400", "enc", KMEBadRequest, "non-JSON answer"),
    ("error_500", "enc", KMEError, "internal KME error"),
    ("error_503_html", "enc", KMEUnavailable, "non-JSON answer"),
])
def test_broken_answers_become_kme_errors_without_key_bytes(
        broken_kme: BrokenKme, pki: Pki, answer: str, call: str, error: type[KMEError],
        fragment: str) -> None:
    with Etsi014Client(broken_kme.url, pki.sae_files("SAE_1"), retries=1,
                       backoff_s=0.01) as client, pytest.raises(error) as info:
        if call == "enc":
            client.get_keys(answer)
        elif call == "dec":
            client.get_keys_with_ids(answer, [ID])
        else:
            client.status(answer)
    assert type(info.value) is error and fragment in info.value.message
    assert_no_key_bytes(error_texts(info.value), [LEAK])
    # Only a 503 is worth asking again.
    assert broken_kme.hits[answer] == (2 if error is KMEUnavailable else 1)


# -- connections ------------------------------------------------------------------------------

def test_many_calls_share_one_tls_connection(pair: KmePair) -> None:
    a_side, b_side = relay(pair, "KME_A"), relay(pair, "KME_B")
    before = requests_seen(pair, "KME_A", "enc_keys_post", 200)
    with Etsi014Client(a_side.url, pair.pki.sae_files("SAE_1")) as master, \
            Etsi014Client(b_side.url, pair.pki.sae_files("SAE_2")) as slave:
        for _ in range(10):
            master.status("SAE_2")
            keys = master.get_keys("SAE_2", number=2)
            got = slave.get_keys_with_ids("SAE_1", [k.key_id for k in keys])
            assert [k.secret for k in got] == [k.secret for k in keys]
            with pytest.raises(KMEBadRequest):  # an error answer keeps the connection too
                master.get_keys("SAE_404")
        assert (a_side.accepted, b_side.accepted) == (1, 1)
        assert master._pool.num_connections == 1 and slave._pool.num_connections == 1
        assert requests_seen(pair, "KME_A", "enc_keys_post", 200) >= before + 10


def test_client_refuses_a_url_that_is_not_https(pki: Pki) -> None:
    for url in ("http://localhost:8443", "localhost:8443", "https://"):
        with pytest.raises(ValueError, match="https"):
            Etsi014Client(url, pki.sae_files("SAE_1"))


def test_key_is_a_secret_holder() -> None:
    key = Key("k", Secret(b"\x01" * 16))
    assert key.bits == 128 and repr(key) == "Key(key_id='k', secret=<SECRET 128 bits>)"


# -- answers lost after the KME served the request ----------------------------------------------

class LossyFront:
    """A TLS front with a real KME certificate, between the client and that real KME.

    It forwards each request to the KME (as `sae`, so the KME really serves it) and
    loses the first `lose` answers: `drop` closes the connection, `stall` holds it
    open unanswered until the client gives up. The first `cut` connections are closed
    before the TLS handshake, so nothing reaches the KME through them.
    """

    def __init__(self, kmes: KmePair, kme: str, sae: str, *, lose: int = 0,
                 mode: str = "drop", cut: int = 0) -> None:
        self.kme_port = kmes.ports[kme]
        self.upstream_ctx = client_context(kmes.pki.sae_files(sae))
        self.ctx = server_context(kmes.pki.kme_files(kme))
        self.lose, self.mode, self.cut = lose, mode, cut
        self.accepted = 0
        self.forwarded = 0
        self.lost_answers: list[dict[str, Any]] = []
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://localhost:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()
        kmes.on_close(self.close)

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.cut > 0:
                self.cut -= 1
                raw.close()
                continue
            t = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                while (request := _read_request(conn)) is not None:
                    status, body = self._forward(*request)
                    if self.lose > 0:
                        self.lose -= 1
                        self.lost_answers.append(json.loads(body))
                        if self.mode == "stall":  # until the client hangs up
                            with contextlib.suppress(OSError):
                                conn.recv(1)
                        return
                    conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        except (OSError, ssl.SSLError):
            pass

    def _forward(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        upstream = http.client.HTTPSConnection("localhost", self.kme_port,
                                               context=self.upstream_ctx, timeout=10)
        try:
            upstream.request(method, path, body=body,
                             headers={"Content-Type": "application/json"})
            resp = upstream.getresponse()
            answer = resp.status, resp.read()
        finally:
            upstream.close()
        self.forwarded += 1
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for t in self._threads:
            t.join(timeout=5)


def _read_request(conn: ssl.SSLSocket) -> tuple[str, str, bytes] | None:
    """One HTTP/1.1 request (request line, Content-Length body); None when the client left."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = next((int(v) for k, v in (h.split(":", 1) for h in lines[1:])
                   if k.strip().lower() == "content-length"), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    return method, path, body


@pytest.mark.parametrize("mode", ["drop", "stall"])
def test_dec_keys_whose_answer_is_lost_is_not_asked_again(pair: KmePair, mode: str) -> None:
    (key,) = pair.client("SAE_1").get_keys("SAE_2")
    front = LossyFront(pair, "KME_B", "SAE_2", lose=1, mode=mode)
    served = requests_seen(pair, "KME_B", "dec_keys_post", 200)
    refused = requests_seen(pair, "KME_B", "dec_keys_post", 400)
    with Etsi014Client(front.url, pair.pki.sae_files("SAE_2"), retries=3, backoff_s=0.01,
                       timeout_s=0.5) as client, pytest.raises(KMEAnswerLost) as info:
        client.get_keys_with_ids("SAE_1", [key.key_id])
    err = info.value
    # A slow KME may still be answering the front when the client gives up (stall).
    deadline = time.monotonic() + 10
    while front.forwarded < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    # The KME served it once; the client did not ask again (which would have been a 400).
    assert front.forwarded == 1 and front.accepted == 1
    assert requests_seen(pair, "KME_B", "dec_keys_post", 200) == served + 1
    assert requests_seen(pair, "KME_B", "dec_keys_post", 400) == refused
    assert err.status is None and isinstance(err, KMEUnreachable)
    assert "no answer after the request was sent" in err.message
    causes = ["(timed out)"] if mode == "stall" else ["(connection reset)",
                                                      "(connection closed by the KME)"]
    assert any(c in err.message for c in causes)
    assert "may have delivered these keys" in err.message
    assert "unknown key_ID" not in err.message
    assert_no_key_bytes(error_texts(err), [key.secret.expose()])
    # and indeed the key is gone: the lost answer held it
    assert front.lost_answers[0]["keys"][0]["key_ID"] == key.key_id
    with pytest.raises(KMEBadRequest, match="unknown key_ID"):
        pair.client("SAE_2").get_keys_with_ids("SAE_1", [key.key_id])


def test_dec_keys_cut_off_before_sending_is_retried(pair: KmePair) -> None:
    (key,) = pair.client("SAE_1").get_keys("SAE_2")
    front = LossyFront(pair, "KME_B", "SAE_2", cut=2)
    with Etsi014Client(front.url, pair.pki.sae_files("SAE_2"), retries=0) as once, \
            pytest.raises(KMEUnreachable) as info:
        once.get_keys_with_ids("SAE_1", [key.key_id])
    assert type(info.value) is KMEUnreachable  # nothing sent: not an answer lost
    assert front.forwarded == 0
    with Etsi014Client(front.url, pair.pki.sae_files("SAE_2"), retries=2,
                       backoff_s=0.01) as client:
        (got,) = client.get_keys_with_ids("SAE_1", [key.key_id])
    assert got.secret == key.secret
    assert front.accepted == 3 and front.forwarded == 1


def test_enc_keys_whose_answer_is_lost_is_asked_again(pair: KmePair) -> None:
    front = LossyFront(pair, "KME_A", "SAE_1", lose=1)
    with Etsi014Client(front.url, pair.pki.sae_files("SAE_1"), retries=1,
                       backoff_s=0.01) as client:
        keys = client.get_keys("SAE_2", number=2)
    assert front.forwarded == 2 and len(keys) == 2
    # Fresh keys, which the slave gets; the lost answer's keys are orphaned: reserved
    # for the slave, but no master ever told it their IDs (here the front saw them).
    lost = front.lost_answers[0]["keys"]
    assert {k["key_ID"] for k in lost}.isdisjoint(k.key_id for k in keys)
    slave = pair.client("SAE_2")
    got = slave.get_keys_with_ids("SAE_1", [k.key_id for k in keys])
    assert [k.secret for k in got] == [k.secret for k in keys]
    orphans = slave.get_keys_with_ids("SAE_1", [k["key_ID"] for k in lost])
    assert [base64.b64encode(k.secret.expose()).decode() for k in orphans] == \
        [k["key"] for k in lost]
    # With no retry left, the error says the answer was lost, without its key bytes.
    front.lose = 1
    with Etsi014Client(front.url, pair.pki.sae_files("SAE_1"), retries=0) as once, \
            pytest.raises(KMEAnswerLost) as info:
        once.get_keys("SAE_2")
    assert "no answer after the request was sent" in info.value.message
    assert "delivered" not in info.value.message
    assert_no_key_bytes(error_texts(info.value),
                        [base64.b64decode(front.lost_answers[1]["keys"][0]["key"])])
