"""The operator's admin API: only the operator certificate may cut links or read the network."""

from __future__ import annotations

import json
import time

import pytest
import urllib3

from kme.operator import OperatorClient, OperatorError
from qgw.pki import Pki
from qgw.tls import TlsFiles, client_context
from tests.harness import KmePair
from tests.kme.scrape import sample, scrape


def raw(kmes: KmePair, files: TlsFiles, method: str, path: str,
        body: object = None) -> tuple[int, dict[str, object]]:
    pool = urllib3.HTTPSConnectionPool("localhost", kmes.ports["KME_A"],
                                       ssl_context=client_context(files), retries=False)
    try:
        r = pool.urlopen(method, path, body=None if body is None else json.dumps(body))
        return r.status, json.loads(r.data)
    finally:
        pool.close()


def operator(kmes: KmePair) -> OperatorClient:
    client = OperatorClient(kmes.url("KME_A"), "KME_A", kmes.pki.operator_files())
    kmes.on_close(client.close)
    return client


def test_link_down_and_up_through_the_api(kmes: KmePair) -> None:
    op = operator(kmes)
    got = op.set_link("KME_B", False)
    assert got["state"] == "down (operator)" and got["peer_told"] is True
    assert kmes.servers["KME_B"].kme.links["KME_A"].admin_down
    view = op.network()
    assert view["kme_id"] == "KME_A"
    origins = {a["origin"]: a for a in view["network"]}
    assert origins["KME_A"]["links"]["KME_B"]["up"] is False
    assert op.set_link("KME_B", True)["state"] == "up"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        view = op.network()
        heard = {a["origin"]: a["links"] for a in view["network"]}
        if heard.get("KME_B", {}).get("KME_A", {}).get("up"):
            break
        time.sleep(0.1)
    assert heard["KME_B"]["KME_A"]["up"] is True  # the peer's advert reached KME_A


@pytest.mark.parametrize("who", ["sae", "kme"])
def test_others_may_not_operate(kmes: KmePair, pki: Pki, who: str) -> None:
    files = pki.sae_files("SAE_1") if who == "sae" else pki.kme_files("KME_B")
    status, body = raw(kmes, files, "PUT", "/admin/v1/links/KME_B", {"up": False})
    assert status == 401 and "operator" in str(body["message"])
    assert not kmes.servers["KME_A"].kme.links["KME_B"].admin_down
    status, _ = raw(kmes, files, "GET", "/admin/v1/network")
    assert status == 401


@pytest.mark.parametrize("body, message", [
    ({"up": "no"}, "up"), ({}, "up"), (None, "body"),
])
def test_bad_admin_requests(kmes: KmePair, pki: Pki, body: object, message: str) -> None:
    status, got = raw(kmes, pki.operator_files(), "PUT", "/admin/v1/links/KME_B", body)
    assert status == 400 and message in str(got["message"])


def test_unknown_link_and_unreachable_kme(kmes: KmePair) -> None:
    op = operator(kmes)
    with pytest.raises(OperatorError, match="no QKD link to 'KME_Z'"):
        op.set_link("KME_Z", False)
    gone = OperatorClient("https://127.0.0.1:1", "KME_A", kmes.pki.operator_files(),
                          timeout_s=1)
    with pytest.raises(OperatorError, match="unreachable"):
        gone.network()
    gone.close()


def test_operator_cut_shows_in_metrics_at_both_ends(kmes: KmePair) -> None:
    ports = kmes.metrics_ports

    def admin_up(kme: str, peer: str) -> float | None:
        return sample(scrape(ports[kme]), "qgw_kme_link_admin_up", peer=peer)

    assert admin_up("KME_A", "KME_B") == 1 and admin_up("KME_B", "KME_A") == 1
    op = operator(kmes)
    assert op.set_link("KME_B", False)["peer_told"] is True
    assert admin_up("KME_A", "KME_B") == 0 and admin_up("KME_B", "KME_A") == 0
    # The classical channel still works, and says so: only admin_up tells the cut.
    text = scrape(ports["KME_A"])
    assert sample(text, "qgw_kme_link_up", peer="KME_B") == 1
    (help_line,) = [ln for ln in text.splitlines() if ln.startswith("# HELP qgw_kme_link_admin_up")]
    assert "operator" in help_line and "qgw_kme_link_up" in help_line
    op.set_link("KME_B", True)
    assert admin_up("KME_A", "KME_B") == 1 and admin_up("KME_B", "KME_A") == 1
