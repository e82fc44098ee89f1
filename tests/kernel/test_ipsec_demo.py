"""The IPsec step of `qgw demo` on a real kernel with ESP (inside the kernel-tier VM)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gateways.ipsec.demo import esp_missing

pytestmark = pytest.mark.timeout(900)


def test_demo_step_reports_a_lossless_rekeying_tunnel() -> None:
    assert esp_missing() is None
    out = subprocess.run([sys.executable, "-m", "gateways.ipsec.demo", "--rekeys", "3"],
                         capture_output=True, text=True, timeout=800)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rekeys"] >= 3 and result["lost"] == 0 and result["duplicates"] == 0
    assert result["sent"] == result["received"] > 0
    assert result["key_sources"] == ["qkd"] and result["rekey_latencies_s"]
