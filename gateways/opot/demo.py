"""The OPoT step of `qgw demo`: a service chain proving every packet's ordered transit.

A client and a server with an ingress, two service functions and an egress between them,
each a network namespace running `qgw gateway opot` (root needed); two KMEs key the links.
The round trip is first measured with every node a plain forwarder (no proofs): use case
15's KPI is the latency OPoT adds, against that.
UDP packets cross the chain while link keys change every second and the egress's
controller rotates the PoT profile every two seconds; every packet must verify.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateways.opot.lab import PY, SERVER_IP, OpotLab
from qgw.netlab import temporary_lab

RECEIVER = f"""
import json, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(({SERVER_IP!r}, 9000)); s.settimeout(3)
seen = []
print("ready", flush=True)
try:
    while True:
        seen.append(int(s.recv(2048)[:8].decode()))
except TimeoutError:
    pass
print(json.dumps({{"n": len(seen), "distinct": len(set(seen)), "max": max(seen, default=-1)}}))
"""
SENDER = f"""
import socket, sys, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.monotonic()
for i in range(n):
    s.sendto(b"%08d" % i + bytes(100), ({SERVER_IP!r}, 9000))
    time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
"""
RTT = f"""
import json, socket, time
out = []
for _ in range(50):
    t = time.perf_counter()
    socket.create_connection(({SERVER_IP!r}, 8000), timeout=2).close()
    out.append(time.perf_counter() - t)
print(json.dumps(out))
"""


@dataclass
class OpotResult:
    sent: int = 0
    received: int = 0
    verified: int = 0
    rejected: int = 0
    rotations: int = 0
    rekeys: int = 0
    first_packet_s: float = 0.0
    rtt_s: list[float] = field(default_factory=list)
    forward_rtt_s: list[float] = field(default_factory=list)   # same chain, no proofs
    rekey_interval_s: float = 1.0

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent and self.rejected == 0


def run_opot(packets: int = 2000, rate: float = 400.0,
             progress: Callable[[str], None] = lambda s: None) -> OpotResult:
    result = OpotResult(sent=packets)
    with temporary_lab("qgw-opot-", "the OPoT step") as (lab, tmp):
        progress("OPoT: client, ingress, SF1, SF2, egress, server as namespaces; 2 KMEs")
        chain = OpotLab(lab, tmp, keys={"rekey_interval_s": result.rekey_interval_s,
                                        "overlap_s": 1.0}, rotate_s=2.0, overlap_s=1.0)
        progress("OPoT: the same chain forwarding without proofs, for the baseline")
        chain.start_http()
        forwarders = chain.forwarding()
        result.forward_rtt_s = _round_trips(chain)
        for svc in forwarders:
            lab.kill(svc)
        started = time.monotonic()
        chain.start()
        progress("OPoT: link keys agreed, the controller pushing the first profile")
        chain.wait_ready()
        result.first_packet_s = time.monotonic() - started
        result.rtt_s = _round_trips(chain)
        rotations = chain.metric("EGRESS", "qgw_opot_rotations_total")
        rekeys = chain.metric("INGRESS", "qgw_session_rekeys_total")
        verified = chain.metric("EGRESS", "qgw_opot_verified_total")
        lab.start("receiver", [PY, "-c", RECEIVER], env=None, ns_of="server")
        time.sleep(1.0)
        progress(f"OPoT: {packets} packets across the chain while keys and profiles change")
        chain.run("client", [PY, "-c", SENDER, str(packets), str(rate)], 120)
        lab.procs["receiver"].wait(timeout=30)
        result.received = json.loads(lab.tail("receiver").strip().splitlines()[-1])[
            "distinct"]
        result.verified = int(chain.metric("EGRESS", "qgw_opot_verified_total") - verified)
        result.rejected = int(chain.metric("EGRESS", "qgw_opot_rejected_total"))
        result.rotations = int(chain.metric("EGRESS", "qgw_opot_rotations_total")
                               - rotations)
        result.rekeys = int(chain.metric("INGRESS", "qgw_session_rekeys_total") - rekeys)
    return result


def _round_trips(chain: OpotLab) -> list[float]:
    out = chain.run("client", [PY, "-c", RTT], 60)
    return json.loads(out.stdout) if out.returncode == 0 else []


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")
