"""Trusted-node relay across real KMEs (in-process, mutual TLS on loopback)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from keyclient import KMEBadRequest, KMEUnavailable
from kme.relay import HopAuthError, hop_cost_bytes, seal, unseal
from kme.topology import Topology
from qgw.cli import app
from qgw.commands.kme import network_table, relay_spend
from tests.harness import KmeNet

# A-B-C-D is the short way (3 hops); A-E-F-G-D the detour (4 hops).
CHAIN = Topology.model_validate({
    "name": "chain",
    "nodes": {k: {} for k in ("KME_A", "KME_B", "KME_C", "KME_D", "KME_E", "KME_F", "KME_G")},
    "links": [{"a": a, "b": b, "loss_db": 1, "key_rate_bps": 2e6}
              for a, b in (("KME_A", "KME_B"), ("KME_B", "KME_C"), ("KME_C", "KME_D"),
                           ("KME_A", "KME_E"), ("KME_E", "KME_F"), ("KME_F", "KME_G"),
                           ("KME_G", "KME_D"))],
    "saes": {"SAE_A": "KME_A", "SAE_B": "KME_B", "SAE_D": "KME_D"},
})
SHORT = ["KME_A", "KME_B", "KME_C", "KME_D"]
DETOUR = ["KME_A", "KME_E", "KME_F", "KME_G", "KME_D"]


@pytest.fixture
def net(tmp_path: Path) -> Iterator[KmeNet]:
    n = KmeNet(tmp_path, CHAIN).start()
    try:
        a = n.client("SAE_A")
        n.wait(lambda: a.status("SAE_D").stored_key_count >= 8, what="a relay path with key")
        yield n
    finally:
        n.close()


def path_of(net: KmeNet) -> list[str] | None:
    status = net.clients[0].status("SAE_D")
    ext = status.status_extension or {}
    return ext.get("qkdgw_relay", {}).get("path")


def relay_bits(net: KmeNet, kme: str, peer: str) -> float:
    return net.kme(kme).metrics.relay_link_bits.labels(peer=peer)._value.get()


def test_relayed_keys_are_identical_at_both_ends(net: KmeNet) -> None:
    a, d = net.client("SAE_A"), net.client("SAE_D")
    status = a.status("SAE_D")
    assert status.target_KME_ID == "KME_D"
    assert status.status_extension is not None
    relay = status.status_extension["qkdgw_relay"]
    assert relay["path"] == SHORT and relay["hops"] == 3
    assert relay["link_key_bits_per_key"] == 3 * (32 + 32) * 8
    keys = a.get_keys("SAE_D", 4, 256)
    got = d.get_keys_with_ids("SAE_A", [k.key_id for k in keys])
    assert [k.secret.expose() for k in got] == [k.secret.expose() for k in keys]
    assert len({k.secret.expose() for k in keys}) == 4
    # Each hop spent the keys plus a 32-byte one-time authenticator key of its link.
    cost = hop_cost_bytes(4 * 32) * 8
    assert relay_bits(net, "KME_A", "KME_B") == cost
    assert relay_bits(net, "KME_B", "KME_C") == cost
    assert relay_bits(net, "KME_C", "KME_D") == cost
    assert relay_bits(net, "KME_A", "KME_E") == 0
    roles = {k: net.kme(k).metrics.relayed_keys for k in ("KME_A", "KME_B", "KME_D")}
    assert roles["KME_A"].labels(role="origin")._value.get() == 4
    assert roles["KME_B"].labels(role="transit")._value.get() == 4
    assert roles["KME_D"].labels(role="destination")._value.get() == 4
    # Delivered once: a second fetch is refused.
    with pytest.raises(KMEBadRequest, match="unknown key_ID"):
        d.get_keys_with_ids("SAE_A", [keys[0].key_id])


def stop_key_generation(net: KmeNet) -> None:
    """Zero every link's rate and wait until what was generated before sits at both ends."""
    emitters = [link for kme in net.servers for link in net.kme(kme).links.values()
                if link.emitter]

    async def zero() -> None:
        for link in emitters:
            link.rate_bps = 0.0

    net.loop.run(zero())
    # An emitter makes key, then pushes it, then sleeps. A push that ends after the rate
    # changed is followed by a round that makes key at rate 0 (what credit it had left),
    # and that round's push by nothing more: so wait for two pushes on every link.
    for _ in range(2):
        since = time.monotonic()

        def pushed(since: float = since) -> bool:
            return all((link.last_contact or 0) > since for link in emitters)

        net.wait(pushed, what="a push on every link")

    def settled() -> bool:
        return all(not net.kme(kme).store.unconfirmed_blocks(peer)
                   and link.available_bytes() == net.kme(peer).links[kme].available_bytes()
                   for kme in net.servers for peer, link in net.kme(kme).links.items()
                   if link.emitter)

    net.wait(settled, what="both ends of every link to hold the same key")


def pools(net: KmeNet) -> dict[tuple[str, str], int]:
    """Link key bytes available, seen from each end of each link."""
    return {(kme, peer): link.available_bytes()
            for kme in net.servers for peer, link in net.kme(kme).links.items()}


def test_each_hop_spends_exactly_its_link_key_at_both_ends(net: KmeNet) -> None:
    """The pools themselves, not the relay's own counter: n + 32 bytes per hop (kme.relay)."""
    a, d = net.client("SAE_A"), net.client("SAE_D")
    stop_key_generation(net)
    before = pools(net)
    assert min(before[("KME_A", "KME_B")], before[("KME_B", "KME_C")],
               before[("KME_C", "KME_D")]) >= hop_cost_bytes(4 * 32)
    keys = a.get_keys("SAE_D", 4, 256)
    got = d.get_keys_with_ids("SAE_A", [k.key_id for k in keys])
    assert [k.secret.expose() for k in got] == [k.secret.expose() for k in keys]
    after = pools(net)
    hops = {frozenset(h) for h in itertools.pairwise(SHORT)}
    for (kme, peer), was in before.items():
        spent = was - after[(kme, peer)]
        expected = hop_cost_bytes(4 * 32) if frozenset((kme, peer)) in hops else 0
        assert spent == expected, f"{kme}'s pool with {peer}: spent {spent} B"


def test_kme_status_shows_relay_spend_per_link(net: KmeNet, tmp_path: Path) -> None:
    # The net's PKI is in tmp_path/pki: with the configs, tmp_path is a `--state` folder.
    for kme, cfg in net.configs.items():
        path = tmp_path / "config" / f"{kme}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    a, d = net.client("SAE_A"), net.client("SAE_D")
    keys = a.get_keys("SAE_D", 4, 256)
    d.get_keys_with_ids("SAE_A", [k.key_id for k in keys])
    spend = relay_spend(tmp_path)
    cost = hop_cost_bytes(4 * 32) * 8
    for hop in itertools.pairwise(SHORT):
        assert spend[hop] == cost and spend[(hop[1], hop[0])] == 0
    assert spend[("KME_A", "KME_E")] == 0
    result = CliRunner().invoke(app, ["kme", "status", "--state", str(tmp_path), "--kme",
                                      "KME_B"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines()
            if line.count("│") > 3}
    assert "relay spent (bits)" in result.output
    for x, y in (("KME_A", "KME_B"), ("KME_B", "KME_C"), ("KME_C", "KME_D")):
        assert rows[f"{x} - {y}"].rstrip(" │").endswith(f"{cost:,}"), rows[f"{x} - {y}"]
    assert rows["KME_A - KME_E"].rstrip(" │").endswith(" 0")
    # A KME that does not answer is shown as unknown, not as zero.
    view = {"kme_id": "KME_A", "network": [
        {"origin": "KME_A", "links": {"KME_B": {"up": True, "available_bits": 8}}},
        {"origin": "KME_B", "links": {"KME_A": {"up": True, "available_bits": 8}}}]}
    console = Console(width=200, record=True)
    console.print(network_table(view, {("KME_A", "KME_B"): 640.0}))
    assert "640 + ?" in console.export_text()


def test_neighbours_still_share_keys_directly(net: KmeNet) -> None:
    a, b = net.client("SAE_A"), net.client("SAE_B")
    direct = a.get_keys("SAE_B", 2)
    got = b.get_keys_with_ids("SAE_A", [k.key_id for k in direct])
    assert [k.secret for k in got] == [k.secret for k in direct]
    assert relay_bits(net, "KME_A", "KME_B") == 0  # the direct link, no relay


def test_path_changes_when_a_link_goes_down_and_back(net: KmeNet) -> None:
    a, d = net.client("SAE_A"), net.client("SAE_D")
    net.loop.run(net.kme("KME_B").set_link("KME_C", False))
    assert net.kme("KME_C").links["KME_B"].admin_down  # the far end was told
    net.wait(lambda: path_of(net) == DETOUR, what="the relay path to avoid B-C")
    keys = a.get_keys("SAE_D", 2)
    assert [k.secret.expose() for k in d.get_keys_with_ids("SAE_A", [k.key_id for k in keys])] == \
        [k.secret.expose() for k in keys]
    assert relay_bits(net, "KME_G", "KME_D") > 0
    net.loop.run(net.kme("KME_C").set_link("KME_B", True))
    net.wait(lambda: path_of(net) == SHORT, what="the short path to come back")


def test_a_hop_failing_mid_relay_is_routed_around(net: KmeNet) -> None:
    """KME_C dies; before the news spreads, the master's KME learns it from the failed hop."""
    a, d = net.client("SAE_A"), net.client("SAE_D")
    stored = a.get_keys("SAE_D", 1)  # a key waiting at KME_D when C goes
    net.loop.run(net.servers.pop("KME_C").stop())
    keys = a.get_keys("SAE_D", 1)
    assert relay_bits(net, "KME_G", "KME_D") > 0
    got = d.get_keys_with_ids("SAE_A", [stored[0].key_id, keys[0].key_id])
    assert [k.secret.expose() for k in got] == [stored[0].secret.expose(), keys[0].secret.expose()]


def test_no_path_is_a_clear_503_and_loses_no_stored_key(net: KmeNet) -> None:
    a, d = net.client("SAE_A", retries=0), net.client("SAE_D")
    stored = a.get_keys("SAE_D", 2)
    for x, y in (("KME_A", "KME_B"), ("KME_A", "KME_E")):
        net.loop.run(net.kme(x).set_link(y, False))
    net.wait(lambda: path_of(net) is None, what="no path left")
    assert a.status("SAE_D").stored_key_count == 0
    with pytest.raises(KMEUnavailable) as err:
        a.get_keys("SAE_D", 1)
    assert err.value.status == 503
    assert "KME_D" in err.value.message and "no path" in err.value.message
    got = d.get_keys_with_ids("SAE_A", [k.key_id for k in stored])
    assert [k.secret.expose() for k in got] == [k.secret.expose() for k in stored]


def test_stored_link_key_stays_usable_on_a_link_that_is_down(net: KmeNet) -> None:
    a, b = net.client("SAE_A"), net.client("SAE_B")
    kme_a = net.kme("KME_A")
    net.loop.run(kme_a.set_link("KME_B", False))
    before = kme_a.links["KME_B"].available_bytes()
    assert before > 64
    keys = a.get_keys("SAE_B", 1)
    assert b.get_keys_with_ids("SAE_A", [keys[0].key_id])[0].secret == keys[0].secret
    net.loop.run(asyncio.sleep(0.3))
    # no new key accrues on a cut link
    assert kme_a.links["KME_B"].available_bytes() == before - 32


# -- the hop cipher ----------------------------------------------------------------------

def test_hop_seal_round_trip_and_tamper() -> None:
    pad = bytes(range(32)) + bytes(range(100, 164))
    header = json.dumps({"hop": 1}).encode()
    payload = b"k" * 64
    ct, tag = seal(pad, header, payload)
    assert ct != payload and len(tag) == 16
    assert unseal(pad, header, ct, tag) == payload
    flipped = bytes([ct[0] ^ 1]) + ct[1:]
    for args in ((pad, header, flipped, tag), (pad, b'{"hop": 2}', ct, tag),
                 (pad, header, ct, bytes(16)), (bytes(len(pad)), header, ct, tag),
                 (pad[:-1], header, ct[:-1], tag)):
        with pytest.raises(HopAuthError):
            unseal(*args)
    with pytest.raises(ValueError):
        seal(pad[:-1], header, payload)


def test_forged_and_replayed_relay_messages_are_refused(net: KmeNet) -> None:
    """A relay message is only accepted once, from the previous hop, with a valid tag."""
    kme_b = net.kme("KME_B")
    body = {"header": base64.b64encode(json.dumps({
        "path": SHORT, "hop": 1, "hop_key_ID": "00000000-0000-0000-0000-000000000000",
        "master": "SAE_A", "slaves": ["SAE_D"], "keys": [{"key_ID": "x", "length": 4}],
    }).encode()).decode(), "ct": base64.b64encode(b"abcd").decode(),
        "tag": base64.b64encode(bytes(16)).decode()}
    from kme.errors import ApiError

    with pytest.raises(ApiError) as err:  # no such hop key: never reserved, or used already
        net.loop.run(kme_b.relay.receive("KME_A", body))
    assert err.value.status == 400 and "unknown key_ID" in err.value.message
    with pytest.raises(ApiError) as err:  # not the previous hop on the path
        net.loop.run(kme_b.relay.receive("KME_C", body))
    assert "not for this hop" in err.value.message
    with pytest.raises(ApiError) as err:
        net.loop.run(kme_b.relay.receive("KME_A", {"header": "!!"}))
    assert "malformed" in err.value.message


def test_etsi004_stream_across_three_hops(net: KmeNet) -> None:
    """A key stream between SAEs whose KMEs share no link: chunks come by relay."""
    from keyclient import Etsi004Client

    src = Etsi004Client(f"https://localhost:{net.ports['KME_A']}", net.pki.sae_files("SAE_A"))
    dst = Etsi004Client(f"https://localhost:{net.ports['KME_D']}", net.pki.sae_files("SAE_D"))
    try:
        opened = src.open_connect("SAE_A", "SAE_D")
        dst.open_connect("SAE_A", "SAE_D", key_stream_id=opened.key_stream_id)
        for index in range(3):
            a = src.get_key(opened.key_stream_id, index)
            d = dst.get_key(opened.key_stream_id, index)
            assert a.index == d.index == index and a.secret == d.secret
        assert net.kme("KME_B").metrics.relayed_keys.labels(role="transit")._value.get() >= 3
        src.close_stream(opened.key_stream_id)
        dst.close_stream(opened.key_stream_id)
    finally:
        src.close()
        dst.close()


def test_metrics_show_relay_and_served_pairs(net: KmeNet) -> None:
    import urllib.request

    a, d = net.client("SAE_A"), net.client("SAE_D")
    keys = a.get_keys("SAE_D", 2)
    d.get_keys_with_ids("SAE_A", [k.key_id for k in keys])
    text = {}
    for kme in ("KME_A", "KME_D"):
        url = f"http://127.0.0.1:{net.metrics_ports[kme]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text[kme] = r.read().decode()
    assert 'qgw_kme_keys_served_total{master="SAE_A",slave="SAE_D"} 2.0' in text["KME_A"]
    assert 'qgw_kme_keys_served_total{master="SAE_A",slave="SAE_D"} 2.0' in text["KME_D"]
    assert "qgw_kme_relay_hops_bucket{le=\"3.0\"} 1.0" in text["KME_A"]
    assert 'qgw_kme_relay_link_key_bits_total{peer="KME_B"} 768.0' in text["KME_A"]
    assert "qgw_kme_link_rate_bps" in text["KME_A"] and "qgw_kme_request_seconds" in text["KME_A"]
    assert 'code="200"' in text["KME_A"]
    for material in (k.secret.expose().hex() for k in keys):
        assert material not in text["KME_A"] and material not in text["KME_D"]
