"""The SCADA step of `qgw demo`: an HMI polling a substation PLC through the QKD-keyed tunnel.

Sites are network namespaces with real TUN devices (`gateways.scada.lab`), so
this step needs root. It measures Modbus polls direct and through the tunnel
while keys rotate every second, and shows the Modbus policy refusing a write.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateways.scada.lab import PY, ScadaLab
from qgw.errors import QgwError
from qgw.netlab import temporary_lab

# Reads anywhere; writes only to breakers CB1 and CB2 (coils 0-1): CB3 is off limits.
POLICY = {"inbound": [{"functions": [1, 2, 3, 4]}, {"functions": [5, 15], "ranges": [[0, 1]]}]}


@dataclass
class ScadaResult:
    rekey_interval_s: float
    polls: dict[str, Any] = field(default_factory=dict)      # through the tunnel
    direct: dict[str, Any] = field(default_factory=dict)     # same path, no tunnel
    rekeys: int = 0
    first_packet_s: float = 0.0
    refused_write: bool = False
    refused_packets: int = 0      # dropped by the substation gateway's Modbus policy

    @property
    def ok(self) -> bool:
        return (self.polls.get("failed") == 0 and self.polls.get("sent", 0) > 0
                and self.refused_write and self.rekeys > 0)


def _hmi(lab: ScadaLab, target: str, *args: str) -> tuple[int, dict[str, Any]]:
    out = lab.run("cc", [PY, "-m", "apps.hmi", "--plc", target, "--json", "--wait", "10",
                         *args], 120)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{") and '"sent"' in line:
            return out.returncode, json.loads(line)
    raise QgwError(f"the HMI printed no summary: {out.stderr[-500:]}")


def _rekeys(lab: ScadaLab) -> int:
    return int(lab.metric("cc", "qgw_session_rekeys_total", peer_sae="SAE_SUB1"))


def _policy_drops(lab: ScadaLab) -> int:
    return int(lab.metric("sub1", "qgw_scada_dropped_packets_total", reason="policy"))


def run_scada(seconds: float = 10.0, rate: float = 50.0,
              progress: Callable[[str], None] = lambda s: None) -> ScadaResult:
    result = ScadaResult(rekey_interval_s=1.0)
    with temporary_lab("qgw-scada-", "the SCADA step (and TUN devices)") as (lab, tmp):
        progress("SCADA: control centre and substation as network namespaces, a KME each")
        sites = ScadaLab(lab, tmp, keys={"rekey_interval_s": result.rekey_interval_s,
                                               "overlap_s": 1.0},
                         modbus=POLICY, substations=(1,))
        sites.start_kmes(["cc", "sub1"])
        lab.start("plc-sub1", [PY, "-m", "apps.plc", "--port", "502",
                               "--status-every", "0"], env=None, ns_of="sub1")
        started = time.monotonic()
        sites.start_gateway("cc")
        sites.start_gateway("sub1")
        progress("SCADA: gateways agreeing their first QKD key")
        sites.wait_reach("cc", "10.99.1.1", 502)
        result.first_packet_s = time.monotonic() - started
        progress(f"SCADA: HMI polling the PLC directly ({seconds / 2:g} s)")
        _, result.direct = _hmi(sites, f"{lab.addresses['sub1']}:502", "--rate", str(rate),
                                "--duration", str(seconds / 2), "--quiet")
        before = _rekeys(sites)
        progress(f"SCADA: HMI polling through the tunnel, keys changing every second "
                 f"({seconds:g} s)")
        _, result.polls = _hmi(sites, "10.99.1.1:502", "--rate", str(rate),
                               "--duration", str(seconds), "--quiet")
        result.rekeys = _rekeys(sites) - before
        progress("SCADA: the HMI tries to open CB3, which the policy forbids")
        drops_before = _policy_drops(sites)
        _, refused = _hmi(sites, "10.99.1.1:502", "--count", "2", "--operate", "CB3=open")
        # Refused means the gateway's policy dropped it (the HMI alone cannot tell a
        # refusal from a lost connection), and the write did not go through after all.
        result.refused_packets = _policy_drops(sites) - drops_before
        result.refused_write = result.refused_packets > 0 and refused.get("operations_ok") == 0
    return result
