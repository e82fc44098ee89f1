"""KME metrics and health: counts and levels, never key material."""

from __future__ import annotations

import base64
import json
import urllib.request

from tests.harness import KmePair
from tests.kme.raw import Raw, error
from tests.kme.scrape import sample, scrape


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (loopback http)
        return r.read().decode()


def test_metrics_count_deliveries_and_show_link_state(kmes: KmePair) -> None:
    a, b = kmes.client("SAE_1"), kmes.client("SAE_2")
    keys = a.get_keys("SAE_2", 3)
    b.get_keys_with_ids("SAE_1", [k.key_id for k in keys])
    text_a = _get(f"http://127.0.0.1:{kmes.metrics_ports['KME_A']}/metrics")
    text_b = _get(f"http://127.0.0.1:{kmes.metrics_ports['KME_B']}/metrics")
    assert 'qgw_kme_keys_delivered_total{role="master"} 3.0' in text_a
    assert 'qgw_kme_keys_delivered_total{role="slave"} 3.0' in text_b
    assert 'qgw_kme_link_up{peer="KME_B"} 1.0' in text_a
    assert 'qgw_kme_requests_total{call="enc_keys_post",code="200"}' in text_a
    assert "qgw_kme_request_seconds_bucket" in text_a and "qgw_kme_link_rate_bps" in text_b
    for k in keys:
        secret = k.secret.expose()
        for text in (text_a, text_b):
            assert k.key_id not in text
            assert base64.b64encode(secret).decode() not in text and secret.hex() not in text


def test_health_describes_links(kmes: KmePair) -> None:
    health = json.loads(_get(f"http://127.0.0.1:{kmes.metrics_ports['KME_B']}/health"))
    assert health["kme_id"] == "KME_B"
    (link,) = health["links"]
    assert link["peer_KME_ID"] == "KME_A" and link["role"] == "receiver" and link["state"] == "up"


def test_errors_are_counted_by_call_and_code(kmes: KmePair, sae1: Raw) -> None:
    error(sae1.call("GET", "/api/v1/keys/SAE_2/enc_keys?number=0"), 400)
    error(sae1.call("POST", "/api/v1/keys/SAE_2/enc_keys", {"number": "2"}), 400)
    error(Raw(kmes, "SAE_2", "KME_A").call("GET", "/api/v1/keys/SAE_1/enc_keys"), 401)
    error(sae1.call("GET", "/api/v1/keys/SAE_9/enc_keys"), 503)  # KME_C: no path to it
    error(sae1.call("DELETE", "/api/v1/keys/SAE_2/enc_keys"), 405)
    text = scrape(kmes.metrics_ports["KME_A"])
    assert sample(text, "qgw_kme_requests_total", call="enc_keys", code="400") == 1
    assert sample(text, "qgw_kme_requests_total", call="enc_keys_post", code="400") == 1
    assert sample(text, "qgw_kme_requests_total", call="enc_keys", code="401") == 1
    assert sample(text, "qgw_kme_requests_total", call="enc_keys", code="503") == 1
    assert sample(text, "qgw_kme_requests_total", call="unknown", code="405") == 1
    assert sample(text, "qgw_kme_requests_total", call="enc_keys", code="200") is None
    # the latency histogram covers failed calls too
    assert sample(text, "qgw_kme_request_seconds_count", call="enc_keys") == 3
