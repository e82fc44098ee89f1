"""The IPsec gateway on a real kernel with ESP (runs inside the VM: tests/test_kernel_tier.py).

Two sites in namespaces, a KME each, both gateways as `qgw gateway ipsec`
processes, real traffic from site A's host to site B's host.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation

from gateways.ipsec.lab import PY, REQID, IpsecLab, host_ip
from qgw.netlab import Lab
from tests.netcapture import read_frames

pytestmark = pytest.mark.timeout(1200)  # an emulated CPU: processes start in seconds, not ms

SA_LINE = re.compile(r"src (\S+) dst (\S+)\s+proto esp spi (0x[0-9a-f]+) reqid (\d+)")
AEAD = re.compile(r"aead rfc4106\(gcm\(aes\)\) 0x([0-9a-f]+) 128")


def owned_sas(text: str) -> dict[int, tuple[str, str, bytes]]:
    """spi -> (src, dst, 36-byte key) of this pair's SAs, from `ip xfrm state` (root only)."""
    out: dict[int, tuple[str, str, bytes]] = {}
    for block in re.split(r"\n(?=src )", text.strip()):
        head, key = SA_LINE.search(block), AEAD.search(block)
        if head and key and int(head.group(4)) == REQID:
            out[int(head.group(3), 16)] = (head.group(1), head.group(2),
                                           bytes.fromhex(key.group(1)))
    return out


def key_source(ipsec: IpsecLab, site: str) -> str | None:
    for name, value in ipsec.metrics(site).items():
        m = re.match(r'qgw_session_key_source\{.*source="(\w+)"', name)
        if m and value == 1.0:
            return m.group(1)
    return None


def capture(ipsec: IpsecLab, out: Path, seconds: float) -> None:
    # The transit link only (eth0): gw-a's LAN to site A carries the stream in clear.
    ipsec.lab.start("capture", [PY, "-m", "tests.netcapture", str(out), str(seconds), "eth0"],
                    env=None, ns_of="gw-a")
    deadline = time.monotonic() + 300
    while "capturing" not in ipsec.lab.tail("capture"):
        assert time.monotonic() < deadline, "the capture did not start"
        time.sleep(0.1)


def test_traffic_crosses_as_esp_only_decrypts_independently_and_survives_rekeys(
        lab: Lab, tmp_path: Path) -> None:
    ipsec = IpsecLab(lab, tmp_path, keys={"rekey_interval_s": 2.0, "overlap_s": 1.0})
    ipsec.start()
    ipsec.wait_protected()

    # Only ESP crosses the transit link; scapy decrypts it with the kernel's own SA keys.
    frames_file = tmp_path / "transit.frames"
    capture(ipsec, frames_file, 900)
    # Keys change every 2 s: note every SA site B's gateway holds while the burst flows.
    keys: dict[int, tuple[str, str, bytes]] = {}
    done = threading.Event()

    def note_keys() -> None:
        while not done.wait(0.2):
            keys.update(owned_sas(ipsec.xfrm_state("b")))

    watcher = threading.Thread(target=note_keys)
    watcher.start()
    try:
        burst = ipsec.stream(count=300, rate=150)
    finally:
        done.set()
        watcher.join()
    lab.kill("capture", signal.SIGTERM)
    assert burst["lost"] == 0 and burst["distinct"] == 300, burst
    ip_frames = [IP(f[14:]) for f in read_frames(frames_file) if f[12:14] == b"\x08\x00"]
    between = [p for p in ip_frames if {p.src, p.dst} == {lab.addresses["gw-a"],
                                                           lab.addresses["gw-b"]}]
    assert not any(p.haslayer(UDP) and p[UDP].dport == 9000 for p in ip_frames), \
        "plaintext of the stream on the transit link"
    esp = [p for p in between if p.proto == 50]
    assert len(esp) >= 300, f"only {len(esp)} ESP packets seen"
    decrypted = []
    for p in esp:
        sa = keys.get(p[ESP].spi)
        if sa is None or p.dst != lab.addresses["gw-b"]:
            continue
        src, dst, key = sa
        inner = SecurityAssociation(ESP, spi=p[ESP].spi, crypt_algo="AES-GCM", crypt_key=key,
                                    tunnel_header=IP(src=src, dst=dst)).decrypt(p)
        assert inner.src == host_ip("a") and inner.dst == host_ip("b")
        decrypted.append(int.from_bytes(bytes(inner[UDP].payload)[:8], "big"))
    assert len(decrypted) >= 50, f"{len(decrypted)} packets decrypted of {len(esp)}"
    assert len(set(decrypted)) == len(decrypted) and max(decrypted) < 300

    # A steady flow across at least 20 rekeys: nothing lost, nothing duplicated.
    rekeys_before = ipsec.metric("a", "qgw_session_rekeys_total")
    flow = ipsec.stream(count=9000, rate=200)
    rekeys = ipsec.metric("a", "qgw_session_rekeys_total") - rekeys_before
    assert rekeys >= 20, f"only {rekeys} rekeys during the flow"
    assert flow["lost"] == 0 and flow["duplicates"] == 0, flow
    assert flow["sender"]["send_errors"] == 0, flow

    # Old SAs are gone: what is left is the current epoch and at most one in its overlap.
    left = owned_sas(ipsec.xfrm_state("a"))
    epochs = {spi & 0xFFFF for spi in left}
    assert len(left) <= 4 and max(epochs) - min(epochs) <= 3, sorted(map(hex, left))

    # Stop removes every SA and policy the gateway installed.
    for site in "ab":
        lab.kill(f"ipsec-{site}", signal.SIGTERM)
        assert not owned_sas(ipsec.xfrm_state(site))
        assert f"reqid {REQID}" not in ipsec.xfrm_policies(site)


def policy(mode: str) -> dict[str, object]:
    # A small key pool: a KME outage reaches the supply policy after two rekeys, not eight.
    return {"mode": mode, "rekey_interval_s": 2.0, "overlap_s": 0.5, "grace_s": 3.0,
            "pool_target": 2, "pool_low": 1}


def outage(ipsec: IpsecLab, mode: str, *, keeps_flowing: bool) -> None:
    """KME_A goes away mid-run: the supply policy decides; it comes back: QKD again."""
    lab = ipsec.lab
    want = "hybrid" if mode == "hybrid" else "qkd"
    deadline = time.monotonic() + 120
    while key_source(ipsec, "a") != want:   # qkd-or-pqc: ML-KEM if the KME answered late
        assert time.monotonic() < deadline, f"{mode}: no {want} key"
        time.sleep(0.5)
    lab.kill("kme-a")
    deadline = time.monotonic() + 180
    while (key_source(ipsec, "a") != "pqc" if keeps_flowing
           else ipsec.metric("a", "qgw_ipsec_protected") != 0.0):
        assert time.monotonic() < deadline, f"{mode}: no change 180 s after the KME went"
        time.sleep(1)
    during = ipsec.stream(count=200, rate=100)
    if keeps_flowing:
        assert during["lost"] == 0 and during["distinct"] == 200, (mode, during)
        assert key_source(ipsec, "a") == "pqc"
    else:
        # Failed closed: nothing delivered, and nothing in clear (no SA: the kernel drops).
        assert during["distinct"] == 0, (mode, during)
        assert not owned_sas(ipsec.xfrm_state("a"))
        assert f"reqid {REQID}" in ipsec.xfrm_policies("a")
    ipsec.start_kme("a")
    deadline = time.monotonic() + 120
    while key_source(ipsec, "a") != want or ipsec.metric("a", "qgw_ipsec_protected") != 1.0:
        assert time.monotonic() < deadline, f"{mode}: QKD keys did not come back"
        time.sleep(0.5)
    after = ipsec.stream(count=200, rate=100)
    assert after["lost"] == 0 and after["distinct"] == 200, (mode, after)


def sa_keys(ipsec: IpsecLab, site: str) -> set[bytes]:
    return {key for _, _, key in owned_sas(ipsec.xfrm_state(site)).values()}


def restart(ipsec: IpsecLab, mode: str, sig: int) -> None:
    """Stop both gateways with `sig` and start them again under `mode`."""
    for site in "ab":
        ipsec.lab.kill(f"ipsec-{site}", sig)
        ipsec.configs[site] = ipsec.write_config(site, keys=policy(mode))
    ipsec.start_gateway("b")
    ipsec.start_gateway("a")
    ipsec.wait_protected()


def test_kme_outages_follow_each_supply_policy_and_restarts_clean_stale_sas(
        lab: Lab, tmp_path: Path) -> None:
    ipsec = IpsecLab(lab, tmp_path, keys=policy("qkd"))
    ipsec.start()
    ipsec.wait_protected()
    outage(ipsec, "qkd", keeps_flowing=False)

    # Both gateways crash (SIGKILL: their SAs and policies stay behind) and come back
    # under the hybrid policy: each first removes what its earlier run left.
    before = {site: owned_sas(ipsec.xfrm_state(site)) for site in "ab"}
    old_keys = {site: sa_keys(ipsec, site) for site in "ab"}
    assert all(before.values())
    restart(ipsec, "hybrid", signal.SIGKILL)
    for site in "ab":
        assert "left by an earlier run" in lab.tail(f"ipsec-{site}")
        fresh = sa_keys(ipsec, site)
        assert fresh and not fresh & old_keys[site], f"gw-{site} kept a stale SA"
    outage(ipsec, "hybrid", keeps_flowing=False)

    restart(ipsec, "qkd-or-pqc", signal.SIGTERM)
    outage(ipsec, "qkd-or-pqc", keeps_flowing=True)

    # The slave alone crashes and restarts: it drops its stale SAs, and the running master
    # goes on from its own epoch, so the new SAs have new SPIs too.
    held = set(owned_sas(ipsec.xfrm_state("b")))
    lab.kill("ipsec-b")
    ipsec.start_gateway("b")
    deadline = time.monotonic() + 120
    while set(owned_sas(ipsec.xfrm_state("b"))) & held:
        assert time.monotonic() < deadline, "the slave kept stale SAs after its restart"
        time.sleep(0.5)
    ipsec.wait_protected()
    assert "left by an earlier run" in lab.tail("ipsec-b")
    assert set(owned_sas(ipsec.xfrm_state("b")))
