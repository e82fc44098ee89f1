"""The SCADA gateway on real TUN devices: HMI and PLC in separate sites, through the tunnel.

Sites are network namespaces (gateways/scada/lab.py): the control
centre runs the HMI and its gateway, each substation a PLC and its gateway,
every site its own KME; the tunnel's UDP crosses the lab's bridge, where a
capture looks for Modbus in clear.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gateways.scada.lab import PY, ScadaLab
from qgw.netlab import Lab
from tests.netcapture import read_frames, udp_tcp_ports

# Reads anywhere; writes only to the breaker coils of CB1 and CB2 (coils 0-1), not CB3.
POLICY = {"inbound": [{"functions": [1, 2, 3, 4]}, {"functions": [5, 15], "ranges": [[0, 1]]}]}
# Modbus/TCP bytes every poll sends: MBAP (protocol 0, length 6, unit 1) + FC4 of 10 registers.
POLL_BYTES = bytes.fromhex("0000" "0006" "01" "04" "0000" "000a")


def hmi(lab: ScadaLab, *args: str, timeout_s: float = 60) -> tuple[int, dict[str, object]]:
    out = lab.run("cc", [PY, "-m", "apps.hmi", "--plc", "10.99.1.1:502", "--json", "--wait", "10",
                         *args], timeout_s)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    summary = next((x for x in reversed(lines) if "ok" in x and "sent" in x), None)
    assert summary is not None, out.stdout[-2000:] + out.stderr[-2000:]
    return out.returncode, summary


def start_plc(lab: ScadaLab, site: str) -> None:
    lab.lab.start(f"plc-{site}", [PY, "-m", "apps.plc", "--host", "0.0.0.0", "--port", "502",
                                  "--status-every", "1", "--seed", "1"], env=None, ns_of=site)


def stop_plc(lab: ScadaLab, site: str) -> str:
    proc = lab.lab.procs[f"plc-{site}"]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    return lab.lab.tail(f"plc-{site}")


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.netns
@pytest.mark.timeout(150)
def test_hmi_polls_and_operates_the_plc_through_the_tunnel(lab: Lab, tmp_path: Path) -> None:
    s = ScadaLab(lab, tmp_path, modbus=POLICY)
    s.start_kmes()
    start_plc(s, "sub1")
    s.start_gateway("cc")
    s.start_gateway("sub1")
    s.wait_reach("cc", "10.99.1.1", 502)
    capture_file = tmp_path / "transit.cap"
    sniffer = subprocess.Popen(["ip", "netns", "exec", lab.bridge_ns, PY, "-m",
                                "tests.netcapture", str(capture_file), "30"],
                               cwd=str(Path(__file__).resolve().parents[3]),
                               stdout=subprocess.PIPE, text=True)
    try:
        assert sniffer.stdout is not None and "capturing" in sniffer.stdout.readline()
        code, summary = hmi(s, "--rate", "20", "--duration", "3", "--operate", "CB1=open",
                            "--operate", "CB1=close")
        assert code == 0 and summary["failed"] == 0 and summary["ok"] == summary["sent"] >= 40
        assert summary["operations_ok"] == 2
        # CB3 may not be written: the gateway drops the request and resets the connection.
        refused_before = metric(s.metrics("sub1"), "qgw_scada_dropped_packets_total",
                                reason="policy")
        code, summary = hmi(s, "--rate", "5", "--duration", "2", "--operate", "CB3=open")
        assert code == 1 and summary["operations_failed"] == 1, summary
        assert metric(s.metrics("sub1"), "qgw_scada_dropped_packets_total",
                      reason="policy") > refused_before
    finally:
        sniffer.send_signal(signal.SIGTERM)
        sniffer.wait(timeout=10)
        if sniffer.stdout is not None:
            sniffer.stdout.close()
    plc = stop_plc(s, "sub1")
    assert "CB=1/1/1" in plc.splitlines()[-1]      # CB3 never opened; CB1 opened and closed
    writes = re.findall(r"writes (\d+)", plc.splitlines()[-1])
    assert writes == ["2"], plc[-500:]

    frames = read_frames(capture_file)
    ports = [udp_tcp_ports(f) for f in frames]
    tunnel = [p for p in ports if p is not None and p[0] == 17 and 51820 in p[1:]]
    assert len(tunnel) > 100                                 # the polls crossed here...
    assert not [p for p in ports if p is not None and p[0] == 6 and 502 in p[1:]]
    assert not any(POLL_BYTES in f for f in frames)          # ...and never in clear


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_rekey_every_second_under_100_polls_per_second(lab: Lab, tmp_path: Path) -> None:
    s = ScadaLab(lab, tmp_path, keys={"rekey_interval_s": 1, "overlap_s": 1})
    s.start_kmes()
    start_plc(s, "sub1")
    s.start_gateway("cc")
    s.start_gateway("sub1")
    s.wait_reach("cc", "10.99.1.1", 502)
    before = metric(s.metrics("cc"), "qgw_session_rekeys_total", peer_sae="SAE_SUB1")
    # (a packet the kernel sent before the first key was dropped: nothing leaves
    # unprotected; count only what happens under load)
    drops_before = {site: [x for x in s.metrics(site).splitlines()
                           if x.startswith("qgw_scada_dropped_packets_total")]
                    for site in ("cc", "sub1")}
    code, summary = hmi(s, "--rate", "100", "--duration", "32", "--quiet", timeout_s=90)
    rekeys = metric(s.metrics("cc"), "qgw_session_rekeys_total", peer_sae="SAE_SUB1") - before
    assert rekeys >= 30, rekeys
    assert code == 0, summary
    assert summary["failed"] == 0 and summary["duplicate_responses"] == 0
    assert summary["out_of_order_responses"] == 0 and summary["sent"] >= 2500, summary
    plc = stop_plc(s, "sub1").splitlines()[-1]
    assert "duplicates 0" in plc and "dropped 0" in plc, plc
    for site, before_run in drops_before.items():
        after = [x for x in s.metrics(site).splitlines()
                 if x.startswith("qgw_scada_dropped_packets_total")]
        assert after == before_run, (site, before_run, after)


@pytest.mark.netns
@pytest.mark.timeout(150)
def test_late_substation_and_a_restarted_gateway_get_their_own_fresh_keys(
        lab: Lab, tmp_path: Path) -> None:
    s = ScadaLab(lab, tmp_path, keys={"rekey_interval_s": 30})
    s.start_kmes()
    start_plc(s, "sub1")
    start_plc(s, "sub2")
    s.start_gateway("cc")
    s.start_gateway("sub1")
    s.wait_reach("cc", "10.99.1.1", 502)
    assert not s.reach("cc", "10.99.2.1", 502)       # substation 2 has no gateway yet
    s.start_gateway("sub2")                           # it joins later
    s.wait_reach("cc", "10.99.2.1", 502)
    cc = s.metrics("cc")
    assert metric(cc, "qgw_session_keys_fetched_total", peer_sae="SAE_SUB2") >= 1
    assert metric(cc, "qgw_scada_pair_protected", pair="1") == 1
    assert metric(cc, "qgw_scada_pair_protected", pair="2") == 1
    epoch_before = metric(cc, "qgw_session_epoch", peer_sae="SAE_SUB1")
    # Substation 1's gateway is killed and comes back: it rejoins with a fresh key.
    lab.kill("gw-sub1")
    time.sleep(1)
    assert not s.reach("cc", "10.99.1.1", 502)
    s.start_gateway("sub1")
    s.wait_reach("cc", "10.99.1.1", 502)
    cc = s.metrics("cc")
    assert metric(cc, "qgw_session_epoch", peer_sae="SAE_SUB1") > epoch_before
    assert s.reach("cc", "10.99.2.1", 502)            # the other pair never noticed
    code, summary = hmi(s, "--rate", "20", "--duration", "1")
    assert code == 0 and summary["failed"] == 0
