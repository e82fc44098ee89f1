"""Trusted-node relay with every KME in its own network namespace, as separate processes.

A-B-C-D is the short path (3 hops); B-E-C a detour around the B-C link.
The SAE side runs in one more namespace: apps.keysmoke gets keys as SAE_A at
KME_A and fetches them as SAE_D at KME_D, comparing the bytes; the operator
cuts links with `qgw kme link down`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kme.network import prepare
from kme.topology import Topology
from qgw.netlab import Lab
from qgw.pki import kme_dns_name

NET = Topology.model_validate({
    "name": "chain",
    "nodes": {k: {} for k in ("KME_A", "KME_B", "KME_C", "KME_D", "KME_E")},
    "links": [{"a": a, "b": b, "loss_db": 1, "key_rate_bps": 200_000}
              for a, b in (("KME_A", "KME_B"), ("KME_B", "KME_C"), ("KME_C", "KME_D"),
                           ("KME_B", "KME_E"), ("KME_E", "KME_C"))],
    "saes": {"SAE_A": "KME_A", "SAE_D": "KME_D"},
})
PY = sys.executable


def metric(lab: Lab, kme: str, name: str, labels: str = "") -> float:
    url = f"http://{kme_dns_name(kme)}:9443/metrics"
    out = lab.output("sae", [PY, "-c", f"import urllib.request as u; "
                            f"print(u.urlopen({url!r}, timeout=5).read().decode())"], 20)
    assert out.returncode == 0, out.stderr
    pattern = re.escape(name) + (r"\{" + labels + r"\}" if labels else "") + r" ([0-9.e+]+)"
    found = re.findall(pattern, out.stdout)
    return float(found[0]) if found else 0.0


def smoke(lab: Lab, state: Path, count: int = 4, timeout_s: float = 30) -> \
        subprocess.CompletedProcess[str]:
    return lab.output("sae", [PY, "-m", "apps.keysmoke", "--master-kme", "https://kme-a:8443",
                              "--slave-kme", "https://kme-d:8443", "--pki", str(state / "pki"),
                              "--master", "SAE_A", "--slave", "SAE_D", "--count", str(count),
                              "--timeout", str(timeout_s)], timeout_s + 15)


def qgw(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.output("sae", [PY, "-m", "qgw", *args], 30)


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_relay_across_namespaces(lab: Lab, tmp_path: Path) -> None:
    kmes = list(NET.nodes)
    lab.setup([kme_dns_name(k) for k in kmes] + ["sae"])
    state = tmp_path / "state"
    endpoints = prepare(state, NET.to_spec(), dns=True)
    for kme in kmes:
        lab.start(kme_dns_name(kme), [PY, "-m", "qgw", "kme", "serve", "--config",
                                      str(endpoints[kme].config)], env=None)
    ok = smoke(lab, state)
    assert ok.returncode == 0, ok.stdout + ok.stderr + lab.tail("kme-a")
    assert "OK: 4/4 keys matched at both ends" in ok.stdout
    # The keys crossed A-B, B-C, C-D: each hop spent 4 keys + a 32-byte authenticator key.
    spent = (4 * 32 + 32) * 8
    assert metric(lab, "KME_A", "qgw_kme_relay_link_key_bits_total", 'peer="KME_B"') == spent
    assert metric(lab, "KME_B", "qgw_kme_relay_link_key_bits_total", 'peer="KME_C"') == spent
    assert metric(lab, "KME_C", "qgw_kme_relay_link_key_bits_total", 'peer="KME_D"') == spent
    assert metric(lab, "KME_D", "qgw_kme_relayed_keys_total", 'role="destination"') == 4

    # Cut B-C mid-run: the relay goes round it through E.
    cut = qgw(lab, "kme", "link", "down", "KME_B", "KME_C", "--state", str(state),
              "--url", "https://kme-b:8443")
    assert cut.returncode == 0 and "down" in cut.stdout, cut.stdout + cut.stderr
    ok = smoke(lab, state)
    assert ok.returncode == 0 and "OK: 4/4" in ok.stdout, ok.stdout + ok.stderr
    assert metric(lab, "KME_E", "qgw_kme_relayed_keys_total", 'role="transit"') == 4
    assert metric(lab, "KME_B", "qgw_kme_relay_link_key_bits_total", 'peer="KME_C"') == spent

    # Cut E-C too: no path is left, and the master's KME says so with a 503.
    cut = qgw(lab, "kme", "link", "down", "KME_E", "KME_C", "--state", str(state),
              "--url", "https://kme-e:8443")
    assert cut.returncode == 0, cut.stdout + cut.stderr
    deadline = time.monotonic() + 10
    while True:
        got = qgw(lab, "keys", "get", "SAE_D", "--kme", "https://kme-a:8443",
                  "--pki", str(state / "pki"), "--sae", "SAE_A")
        if got.returncode != 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)  # until the news of the cut reached KME_A
    text = " ".join((got.stdout + got.stderr).split())
    assert got.returncode == 1 and "503" in text and "no path" in text, text

    # The operator's live view from any KME shows both outages.
    view = qgw(lab, "kme", "status", "--state", str(state), "--kme", "KME_D",
               "--url", "https://kme-d:8443")
    assert view.returncode == 0, view.stderr
    assert view.stdout.count("DOWN") == 2, view.stdout
