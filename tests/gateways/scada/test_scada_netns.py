"""The SCADA gateway on real TUN devices: HMI and PLC in separate sites, through the tunnel.

Sites are network namespaces (gateways/scada/lab.py): the control
centre runs the HMI and its gateway, each substation a PLC and its gateway,
every site its own KME; the tunnel's UDP crosses the lab's bridge, where a
capture looks for Modbus in clear. KMEs and gateways are killed and restarted
as real processes: the supply policy and the rejoining are the gateways' own.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateways.scada.lab import PY, UDP_PORT, ScadaLab
from qgw.netlab import REPO, Lab
from qgw.netlab import metric_value as total
from tests.netcapture import read_frames, udp_tcp_ports

# Reads anywhere; writes only to the breaker coils of CB1 and CB2 (coils 0-1), not CB3.
POLICY = {"inbound": [{"functions": [1, 2, 3, 4]}, {"functions": [5, 15], "ranges": [[0, 1]]}]}
# Modbus/TCP bytes every poll sends: MBAP (protocol 0, length 6, unit 1) + FC4 of 10 registers.
POLL_BYTES = bytes.fromhex("0000" "0006" "01" "04" "0000" "000a")
DROPS = "qgw_scada_dropped_packets_total"


def hmi(lab: ScadaLab, *args: str, plc: str = "10.99.1.1:502",
        timeout_s: float = 60) -> tuple[int, dict[str, Any]]:
    out = lab.run("cc", [PY, "-m", "apps.hmi", "--plc", plc, "--json", "--wait", "10", *args],
                  timeout_s)
    summary = _summary(out.stdout)
    assert summary is not None, out.stdout[-2000:] + out.stderr[-2000:]
    return out.returncode, summary


def _summary(text: str) -> dict[str, Any] | None:
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return next((x for x in reversed(lines) if "ok" in x and "sent" in x), None)


def start_plc(lab: ScadaLab, site: str) -> None:
    lab.lab.start(f"plc-{site}", [PY, "-m", "apps.plc", "--host", "0.0.0.0", "--port", "502",
                                  "--status-every", "1", "--seed", "1"], env=None, ns_of=site)


def stop_plc(lab: ScadaLab, site: str) -> str:
    proc = lab.lab.procs[f"plc-{site}"]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    return lab.lab.tail(f"plc-{site}")


@contextlib.contextmanager
def transit_capture(lab: ScadaLab, out: Path) -> Iterator[None]:
    """Capture every frame on the lab's bridge (the transit network) while the block runs."""
    sniffer = subprocess.Popen(["ip", "netns", "exec", lab.lab.bridge_ns, PY, "-m",
                                "tests.netcapture", str(out), "300"],
                               cwd=str(REPO), stdout=subprocess.PIPE, text=True)
    try:
        assert sniffer.stdout is not None and "capturing" in sniffer.stdout.readline()
        yield
    finally:
        sniffer.send_signal(signal.SIGTERM)
        sniffer.wait(timeout=10)
        if sniffer.stdout is not None:
            sniffer.stdout.close()


def assert_no_modbus_in_clear(capture: Path) -> int:
    """The captured frames carry no Modbus/TCP in clear; returns how many were tunnel UDP."""
    frames = read_frames(capture)
    ports = [udp_tcp_ports(f) for f in frames]
    assert not [p for p in ports if p is not None and p[0] == 6 and 502 in p[1:]]
    assert not any(POLL_BYTES in f for f in frames)
    return len([p for p in ports if p is not None and p[0] == 17 and UDP_PORT in p[1:]])


def wait_until(what: str, check: Callable[[], bool], lab: ScadaLab,
               timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s:\n" + "\n".join(
            f"--- {p}:\n{lab.lab.tail(p)}" for p in lab.lab.procs)
        time.sleep(0.2)


def session(lab: ScadaLab, site: str) -> tuple[str | None, str | None]:
    """(state, key source) of pair 1's key session at `site`'s gateway."""
    peer = "SAE_SUB1" if site == "cc" else "SAE_CC"
    found: dict[str, str] = {}
    for family in text_string_to_metric_families(lab.metrics(site)):
        for sample in family.samples:
            if sample.value == 1.0 and sample.labels.get("peer_sae") == peer:
                if sample.name == "qgw_session_state":
                    found["state"] = sample.labels["state"]
                elif sample.name == "qgw_session_key_source":
                    found["source"] = sample.labels["source"]
    return found.get("state"), found.get("source")


def start_hmi(lab: ScadaLab, name: str) -> None:
    """An HMI polling 5 times a second in the background, a JSON line per poll.

    (Its 0.5 s timeout is 10x the slowest poll seen here on a loaded machine, and
    makes dropped polls show quickly.)
    """
    lab.lab.start(name, [PY, "-m", "apps.hmi", "--plc", "10.99.1.1:502", "--json", "--rate", "5",
                         "--wait", "60", "--timeout", "0.5"], env=None, ns_of="cc")


def polls(lab: ScadaLab, name: str) -> list[bool]:
    """Whether each poll of a background HMI was ok, in order, so far."""
    text = lab.lab.logs(name).read_text()
    done = text[:text.rfind("\n") + 1]         # not a line the HMI is still writing
    lines = [json.loads(x) for x in done.splitlines() if x.startswith("{")]
    return [x["ok"] for x in lines if x.get("event") == "poll"]


def stop_hmi(lab: ScadaLab, name: str) -> dict[str, Any]:
    lab.lab.kill(name, signal.SIGTERM)
    summary = _summary(lab.lab.logs(name).read_text())
    assert summary is not None, lab.lab.tail(name)
    return summary


@pytest.mark.netns
@pytest.mark.timeout(150)
def test_hmi_polls_and_operates_the_plc_through_the_tunnel(lab: Lab, tmp_path: Path) -> None:
    s = ScadaLab(lab, tmp_path, modbus=POLICY, substations=(1,))
    s.start_kmes(["cc", "sub1"])
    start_plc(s, "sub1")
    s.start_gateway("cc")
    s.start_gateway("sub1")
    s.wait_reach("cc", "10.99.1.1", 502)
    capture_file = tmp_path / "transit.cap"
    with transit_capture(s, capture_file):
        code, summary = hmi(s, "--rate", "20", "--duration", "3", "--operate", "CB1=open",
                            "--operate", "CB1=close")
        assert code == 0 and summary["failed"] == 0 and summary["ok"] == summary["sent"] >= 40
        assert summary["operations_ok"] == 2
        # CB3 may not be written: the gateway drops the request and resets the connection.
        refused_before = s.metric("sub1", DROPS, reason="policy")
        code, summary = hmi(s, "--rate", "5", "--duration", "2", "--operate", "CB3=open")
        assert code == 1 and summary["operations_failed"] == 1, summary
        assert s.metric("sub1", DROPS, reason="policy") > refused_before
    plc = stop_plc(s, "sub1")
    assert "CB=1/1/1" in plc.splitlines()[-1]      # CB3 never opened; CB1 opened and closed
    writes = re.findall(r"writes (\d+)", plc.splitlines()[-1])
    assert writes == ["2"], plc[-500:]

    # The polls crossed the transit link, and never in clear.
    assert assert_no_modbus_in_clear(capture_file) > 100


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_rekey_every_second_under_100_polls_per_second(lab: Lab, tmp_path: Path) -> None:
    s = ScadaLab(lab, tmp_path, keys={"rekey_interval_s": 1, "overlap_s": 1}, substations=(1,))
    s.start_kmes(["cc", "sub1"])
    start_plc(s, "sub1")
    s.start_gateway("cc")
    s.start_gateway("sub1")
    s.wait_reach("cc", "10.99.1.1", 502)
    before = s.metric("cc", "qgw_session_rekeys_total", peer_sae="SAE_SUB1")
    # (a packet the kernel sent before the first key was dropped: nothing leaves
    # unprotected; count only what happens under load)
    drops_before = {site: {k: v for k, v in s.samples(site).items() if k.startswith(DROPS)}
                    for site in ("cc", "sub1")}
    code, summary = hmi(s, "--rate", "100", "--duration", "32", "--quiet", timeout_s=90)
    rekeys = s.metric("cc", "qgw_session_rekeys_total", peer_sae="SAE_SUB1") - before
    assert rekeys >= 30, rekeys
    assert code == 0, summary
    assert summary["failed"] == 0 and summary["duplicate_responses"] == 0
    assert summary["out_of_order_responses"] == 0, summary
    # The load asked for: 100 polls a second over the whole run, not merely some polls.
    assert summary["elapsed_s"] >= 31 and summary["sent"] / summary["elapsed_s"] >= 95, summary
    plc = stop_plc(s, "sub1").splitlines()[-1]
    assert "duplicates 0" in plc and "dropped 0" in plc, plc
    for site, before_run in drops_before.items():
        after = {k: v for k, v in s.samples(site).items() if k.startswith(DROPS)}
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
    assert total(cc, "qgw_session_keys_fetched_total", peer_sae="SAE_SUB2") >= 1
    assert total(cc, "qgw_scada_pair_protected", pair="1") == 1
    assert total(cc, "qgw_scada_pair_protected", pair="2") == 1
    epoch_before = total(cc, "qgw_session_epoch", peer_sae="SAE_SUB1")
    # Substation 1's gateway is killed and comes back: it rejoins with a fresh key.
    s.stop_gateway("sub1", signal.SIGKILL)
    assert not s.reach("cc", "10.99.1.1", 502)
    s.start_gateway("sub1")
    s.wait_reach("cc", "10.99.1.1", 502)
    assert s.metric("cc", "qgw_session_epoch", peer_sae="SAE_SUB1") > epoch_before
    assert s.reach("cc", "10.99.2.1", 502)            # the other pair never noticed
    code, summary = hmi(s, "--rate", "20", "--duration", "1")
    assert code == 0 and summary["failed"] == 0

    # The control centre's gateway, the hub holding every pair, crashes and comes back:
    # it knows no key any more, so each pair gets a new epoch with a new QKD key.
    cc_epochs = {n: s.metric("cc", "qgw_session_epoch", peer_sae=f"SAE_SUB{n}") for n in (1, 2)}
    sub_epochs = {n: s.metric(f"sub{n}", "qgw_session_epoch") for n in (1, 2)}
    s.stop_gateway("cc", signal.SIGKILL)
    assert not s.reach("cc", "10.99.1.1", 502)
    s.start_gateway("cc")
    s.wait_reach("cc", "10.99.1.1", 502)
    s.wait_reach("cc", "10.99.2.1", 502)
    after = {site: s.metrics(site) for site in ("cc", "sub1", "sub2")}
    for n in (1, 2):
        sub = f"sub{n}"
        # (the restarted process counts from zero: these keys were fetched after it came back)
        assert total(after["cc"], "qgw_session_keys_fetched_total", peer_sae=f"SAE_SUB{n}") >= 1
        assert total(after["cc"], "qgw_session_epoch", peer_sae=f"SAE_SUB{n}") > cc_epochs[n]
        assert total(after[sub], "qgw_session_epoch") > sub_epochs[n], (sub, after[sub])
        assert total(after[sub], "qgw_session_key_source", source="qkd") == 1
    for site, samples in after.items():
        assert total(samples, DROPS, reason="auth_failed") == 0, (site, samples)
    for plc in ("10.99.1.1:502", "10.99.2.1:502"):
        code, summary = hmi(s, "--rate", "20", "--duration", "1", plc=plc)
        assert code == 0 and summary["failed"] == 0, (plc, summary)


def supply(mode: str) -> dict[str, object]:
    # No key pool: every rekey (each second) asks both KMEs, so an outage reaches the
    # supply policy at the next rekey rather than after the pool has run dry.
    return {"mode": mode, "rekey_interval_s": 1.0, "overlap_s": 0.5, "grace_s": 3.0,
            "pool_target": 0, "pool_low": 0}


def outage(s: ScadaLab, mode: str, capture: Path) -> None:
    """Both KMEs of pair 1 go away while the HMI polls; the supply policy decides; they
    come back: QKD keys and polls again."""
    want = "hybrid" if mode == "hybrid" else "qkd"
    hmi_name = f"hmi-{mode}"
    start_hmi(s, hmi_name)           # while the gateways agree their first key
    wait_until(f"{mode}: the HMI polling", lambda: polls(s, hmi_name).count(True) >= 3, s)
    # Under qkd-or-pqc the first key may be ML-KEM's, if the KME answered late at start.
    wait_until(f"{mode}: a {want} key", lambda: session(s, "cc") == ("protected", want), s)
    no_key = s.metric("cc", DROPS, pair="1", reason="no_key")
    with transit_capture(s, capture):
        s.lab.kill("kme-cc")
        s.lab.kill("kme-sub1")
        if mode == "qkd-or-pqc":
            wait_until("the ML-KEM fallback", lambda: session(s, "cc")[1] == "pqc", s)
            seen = len(polls(s, hmi_name))
            wait_until("polls under ML-KEM keys", lambda: len(polls(s, hmi_name)) >= seen + 5, s)
            assert session(s, "sub1") == ("protected", "pqc")
            assert session(s, "cc") == ("protected", "pqc")     # the KMEs are still down
        else:
            states: list[str | None] = []

            def rekey_failing() -> bool:
                states.append(session(s, "cc")[0])
                return states[-1] in ("grace", "failed-closed")

            wait_until(f"{mode}: a failing rekey", rekey_failing, s)
            assert states[-1] == "grace", f"missed the grace period: {states}"
            # Every poll from here on is answered under the kept key, or not at all:
            # the KMEs are gone, so no new key can come.
            seen = len(polls(s, hmi_name))
            wait_until(f"{mode}: failing closed",
                       lambda: session(s, "cc")[0] == "failed-closed", s)
            wait_until(f"{mode}: failed polls",
                       lambda: polls(s, hmi_name)[seen:].count(False) >= 2, s)
            during = polls(s, hmi_name)[seen:]
            in_grace = during[:during.index(False)]
            assert len(in_grace) >= 3 and all(in_grace), during   # the grace period...
            assert not any(during[len(in_grace):]), during         # ...then closed
            assert session(s, "cc")[1] is None
            assert s.metric("cc", DROPS, pair="1", reason="no_key") > no_key
    # Polls crossed the transit link while the capture ran, never in clear.
    assert assert_no_modbus_in_clear(capture) > 0
    s.start_kmes(["cc", "sub1"])
    wait_until(f"{mode}: {want} keys again", lambda: session(s, "cc") == ("protected", want), s)
    back = len(polls(s, hmi_name))
    wait_until(f"{mode}: polls again", lambda: polls(s, hmi_name)[back:].count(True) >= 3, s)
    assert session(s, "sub1") == ("protected", want)
    summary = stop_hmi(s, hmi_name)
    assert summary["sent"] == summary["ok"] + summary["failed"], summary
    if mode == "qkd-or-pqc":
        assert summary["failed"] == 0 and summary["duplicate_responses"] == 0, summary


@pytest.mark.netns
@pytest.mark.timeout(240)
def test_kme_outage_follows_each_supply_policy(lab: Lab, tmp_path: Path) -> None:
    # One lab for the three policies (starting one costs more than restarting gateways).
    s = ScadaLab(lab, tmp_path, keys=supply("qkd"), substations=(1,))
    s.start_kmes(["cc", "sub1"])
    start_plc(s, "sub1")
    for mode in ("qkd", "hybrid", "qkd-or-pqc"):
        if mode != "qkd":
            s.stop_gateway("cc")
            s.stop_gateway("sub1")
            s.set_keys(supply(mode))
        s.start_gateway("cc")
        s.start_gateway("sub1")
        outage(s, mode, tmp_path / f"transit-{mode}.cap")
