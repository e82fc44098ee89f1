"""The main job, as README.md tells a new user to run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.netns
@pytest.mark.timeout(360)
def test_qgw_demo_runs_and_reports_kpis(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qgw", "demo", "--rekeys", "3", "--interval", "0.5",
         "--state", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=330, env=dict(os.environ, COLUMNS="160"),
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


def test_demo_without_the_scada_step_says_how_to_run_it(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qgw", "demo", "--rekeys", "1", "--interval", "0.5",
         "--no-gateways", "--state", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="160"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SCADA gateway step not run (--no-gateways)" in proc.stdout
