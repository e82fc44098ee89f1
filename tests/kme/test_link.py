"""The simulated QKD link: both stores get the same stream, at the modelled rate, only while
the KME-to-KME channel works, and only with the right peer."""

from __future__ import annotations

import time
from pathlib import Path

from kme.config import KmeConfig
from kme.server import KmeServer
from qgw.pki import Pki
from tests.harness import SAES, KmePair, free_port


def _available(pair: KmePair, kme: str) -> int:
    return pair.servers[kme].kme.links["KME_B" if kme == "KME_A" else "KME_A"].available_bytes()


def test_link_never_outpaces_its_key_rate(tmp_path: Path, pki: Pki) -> None:
    rate = 8400.0  # UC33 Norte-Distrito
    pair = KmePair(tmp_path, pki, rate_bps=rate).start()
    try:
        started = time.monotonic()
        time.sleep(1.5)
        made = _available(pair, "KME_A") * 8
        elapsed = time.monotonic() - started
        block_bits = pair.configs["KME_A"].links[0].block_size * 8
        assert 0 < made <= rate * elapsed + block_bits
    finally:
        pair.close()


def test_both_kmes_hold_the_same_stream(kmes: KmePair) -> None:
    def blocks(kme: str, peer: str) -> dict[int, bytes]:
        db = kmes.servers[kme].kme.store._db
        return dict(db.execute("SELECT offset, data FROM block_data WHERE peer=?", (peer,)))

    confirmed = kmes.servers["KME_A"].kme.store.link_state("KME_B").confirmed_end
    at_a, at_b = blocks("KME_A", "KME_B"), blocks("KME_B", "KME_A")
    common = [off for off in at_a if off in at_b and off < confirmed]
    assert common, "no block held by both KMEs"
    assert all(at_a[off] == at_b[off] for off in common)
    # every allocatable byte is held by the receiver
    assert kmes.servers["KME_B"].kme.store.link_state("KME_A").end >= confirmed > 0


def test_no_key_while_the_peer_is_down_and_state_is_visible(kmes: KmePair) -> None:
    a = kmes.client("SAE_1")
    assert a.status("SAE_2").status_extension["qkdgw_link"]["state"] == "up"  # type: ignore[index]
    kmes.stop("KME_B")
    time.sleep(0.5)
    st = a.status("SAE_2")
    assert st.status_extension["qkdgw_link"]["state"] == "down"  # type: ignore[index]
    frozen = st.stored_key_count
    time.sleep(1.0)
    assert a.status("SAE_2").stored_key_count == frozen  # no QKD without the classical channel
    kmes.start("KME_B")
    deadline = time.monotonic() + 10
    while a.status("SAE_2").stored_key_count <= frozen:
        assert time.monotonic() < deadline, "link did not resume"
        time.sleep(0.05)
    assert a.status("SAE_2").status_extension["qkdgw_link"]["state"] == "up"  # type: ignore[index]


def test_link_refuses_a_peer_with_another_kmes_certificate(tmp_path: Path, pki: Pki) -> None:
    """KME_A's link to KME_B points at a server that is really KME_C (same CA)."""
    pair = KmePair(tmp_path, pki)
    impostor_port = free_port()
    f = pki.kme_files("KME_C")
    impostor = KmeServer(KmeConfig.model_validate({
        "kme_id": "KME_C", "listen": {"host": "127.0.0.1", "port": impostor_port},
        "tls": {"ca": f.ca, "cert": f.cert, "key": f.key}, "store": tmp_path / "c.sqlite",
        "saes": SAES}))
    cfg = pair.configs["KME_A"]
    link = cfg.links[0].model_copy(update={"url": f"https://localhost:{impostor_port}"})
    pair.configs["KME_A"] = cfg.model_copy(update={"links": [link]})
    pair.loop.run(impostor.start())
    pair.start("KME_A")
    try:
        time.sleep(1.0)
        st = pair.client("SAE_1").status("SAE_2")
        assert st.stored_key_count == 0
        assert st.status_extension["qkdgw_link"]["state"] == "down"  # type: ignore[index]
    finally:
        pair.loop.run(impostor.stop())
        pair.close()
