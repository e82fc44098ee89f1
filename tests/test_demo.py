"""The main job, as README.md tells a new user to run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateways.ledger.demo import MOSQUITTO, run_ledger


@pytest.mark.netns
@pytest.mark.timeout(480)
def test_qgw_demo_runs_and_reports_kpis(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qgw", "demo", "--rekeys", "3", "--interval", "0.5",
         "--state", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=450, env=dict(os.environ, COLUMNS="160"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for kpi in ("time to get a QKD key", "21.75 s (UC35)", "rekeys completed",
                "key pool level", "epochs with identical keys"):
        assert kpi in out, out
    assert re.search(r"rekeys completed\s*│[^│]*│\s*(\d+) \(0 failed\)", out)
    match = re.search(r"epochs with identical keys at both gateways\s*│[^│]*│\s*(\d+)/(\d+)",
                      out)
    assert match and match.group(1) == match.group(2) and int(match.group(1)) >= 3
    assert "ok" in out
    assert ("IPsec step not run" in out and "CONFIG_INET_ESP" in out) or \
        "IPsec gateway: kernel ESP" in out, out
    assert "SCADA gateway: HMI -> PLC Modbus/TCP" in out, out   # CI runs as root
    polls = re.search(r"polls through the tunnel, failed\s*│[^│]*│\s*(\d+), (\d+) failed", out)
    assert polls and int(polls.group(1)) > 100 and polls.group(2) == "0", out
    assert "refused, connection reset" in out
    rekeys = re.search(r"1 s \((\d+) rekeys during the polls\)", out)
    assert rekeys and int(rekeys.group(1)) >= 5, out
    assert "OPoT: ordered proof of transit" in out, out
    opot = re.search(r"verified at the egress\s*│[^│]*│\s*(\d+) / (\d+) / (\d+)", out)
    assert opot and opot.group(1) == opot.group(2) and int(opot.group(3)) >= int(opot.group(1))
    assert re.search(r"proofs rejected \(false rejections\)\s*│[^│]*│\s*0\s", out), out
    assert "WebRTC gateway: SFrame end-to-end encrypted video call" in out, out
    shown = re.search(r"checked against the sent pattern \(A->B / B->A\)\s*│[^│]*│\s*(\d+) / "
                      r"(\d+)", out)
    assert shown and min(int(shown.group(1)), int(shown.group(2))) > 100, out
    assert re.search(r"lost at key rotations / shown undecodable\s*│[^│]*│\s*0 / 0", out), out
    assert_ledger_step(out, burst=1000)


def test_demo_without_root_runs_the_ledger_step_and_says_how_to_run_the_others(
        tmp_path: Path) -> None:
    state = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "qgw", "demo", "--rekeys", "1", "--interval", "0.5",
         "--no-gateways", "--ledger-burst", "200", "--state", str(state)],
        capture_output=True, text=True, timeout=150, env=dict(os.environ, COLUMNS="160"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SCADA gateway step not run (--no-gateways)" in proc.stdout
    assert "WebRTC step not run (--no-gateways)" in proc.stdout
    assert_ledger_step(proc.stdout, burst=200)
    # What the table says, the reader's output shows: every reading, each once.
    lines = (state / "ledger" / "reader" / "readings.jsonl").read_text().splitlines()
    names = {(r["device"], r["seq"]) for r in map(json.loads, lines)}
    assert len(names) == len(lines) == STEADY + 200
    spied = state / "ledger" / "third-party" / "readings.jsonl"
    assert not spied.exists() or spied.read_text() == ""


STEADY = 10 * 5      # the ledger step's fleet: 10 devices, one reading a second, for 5 s


def assert_ledger_step(out: str, *, burst: int) -> None:
    """The ledger step's table: the trial's KPIs next to ours, and nothing lost or leaked."""
    assert "IoT-to-ledger gateway: sensor readings sealed with QKD keys" in out, out
    transport = "MQTT" if os.access(MOSQUITTO, os.X_OK) else "REST"  # CI installs mosquitto
    assert f"ok: sensors over {transport}" in out, out
    assert re.search(rf"devices at once\s*│\s*10 \(UC35\)\s*│\s*10; {burst:,} in the burst", out)
    assert re.search(r"measurement rate per device\s*│\s*1 / min \(UC35\)\s*│\s*60 / min", out)
    key = re.search(r"time to get a QKD key \(p50\): writer / reader by key ID\s*│\s*"
                    r"21\.75 s \(UC35\)\s*│\s*([\d.]+) ms / ([\d.]+) ms\s*│\s*([\d,]+)x faster",
                    out)
    assert key and max(float(key.group(1)), float(key.group(2))) < 1000, out
    sent = STEADY + burst
    both = re.search(r"records decrypted by the partner / sent\s*│[^│]*│\s*([\d,]+) / ([\d,]+)"
                     r"\s*│\s*each once, as sent", out)
    assert both and int(both.group(1).replace(",", "")) == int(both.group(2).replace(",", "")) \
        == sent, out
    anchored = re.search(r"records anchored on the ledger / batches\s*│[^│]*│\s*([\d,]+) / "
                         r"(\d+)", out)
    assert anchored and int(anchored.group(1).replace(",", "")) == sent, out
    spy = re.search(r"no key \(SAE_3\) decrypts\s*│[^│]*│\s*0 of (\d+)\s*│\s*(\d+) refused: "
                    r"no key", out)
    assert spy and spy.group(1) == spy.group(2) == str(STEADY), out
    assert re.search(rf"batches with reading values in clear\s*│[^│]*│\s*0 of "
                     rf"{anchored.group(2)}\s", out), out


def test_ledger_step_over_rest_without_mosquitto(tmp_path: Path) -> None:
    """Where Mosquitto is missing, the sensors post to the writer's REST ingest."""
    result = run_ledger(tmp_path / "demo", seconds=2.0, burst=100, transport="rest")
    assert result.ok, result
    assert result.transport == "REST"
    assert result.sent == result.delivered == result.anchored == 20 + 100
    assert result.third_party_records == 20 and result.third_party_decrypted == 0
    assert result.writer_key_p50_ms is not None and result.reader_key_p50_ms is not None


def test_demo_help_names_the_ledger_step() -> None:
    proc = subprocess.run([sys.executable, "-m", "qgw", "demo", "--help"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr
    assert "--no-ledger" in proc.stdout and "IoT-to-ledger step" in proc.stdout
