"""A SCADA network in namespaces (demo, benchmark, tests): control centre, substations,
their KMEs and the gateways.

Each site is a namespace on the lab's bridge (the transit network, where the
tunnel's UDP travels); each site runs its own KME (KME_CC, KME_S1, KME_S2,
QKD links CC-S1 and CC-S2) and its gateway (`qgw gateway scada`). Tunnel
addresses: control centre 10.99.0.1, substation n 10.99.n.1.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from kme.network import prepare
from kme.topology import Topology
from qgw.netlab import Lab, metric_value, prometheus_samples

PY = sys.executable
SITES = {"cc": "KME_CC", "sub1": "KME_S1", "sub2": "KME_S2"}
SAES = {"cc": "SAE_CC", "sub1": "SAE_SUB1", "sub2": "SAE_SUB2"}
TOPOLOGY = Topology.model_validate({
    "name": "scada",
    "nodes": {k: {} for k in SITES.values()},
    "links": [{"a": "KME_CC", "b": "KME_S1", "loss_db": 1, "key_rate_bps": 1e6},
              {"a": "KME_CC", "b": "KME_S2", "loss_db": 1, "key_rate_bps": 1e6}],
    "saes": {SAES[s]: k for s, k in SITES.items()},
})
UDP_PORT = 51820
CONTROL_PORT = 7101
METRICS_PORT = 9600


def tunnel_ip(site: str) -> str:
    return "10.99.0.1" if site == "cc" else f"10.99.{site.removeprefix('sub')}.1"


class ScadaLab:
    def __init__(self, lab: Lab, tmp: Path, keys: dict[str, Any] | None = None,
                 modbus: dict[str, Any] | None = None,
                 substations: tuple[int, ...] = (1, 2)) -> None:
        self.lab = lab
        # The control centre's pairs: one whose substation never comes keeps its key
        # session retrying, which costs CPU a run that uses one substation can spare.
        self.substations = substations
        self.tmp = tmp
        lab.setup(list(SITES))
        self.state = tmp / "state"
        self.endpoints = prepare(self.state, TOPOLOGY.to_spec(),
                                 hosts={k: lab.addresses[s] for s, k in SITES.items()})
        self.modbus = modbus
        self.set_keys(keys or {"rekey_interval_s": 5})

    def set_keys(self, keys: dict[str, Any]) -> None:
        """Write every site's config with this key policy (gateways started later use it)."""
        self.keys = keys
        self.configs = {s: self._config(s) for s in SITES}

    def _config(self, site: str) -> Path:
        lab = self.lab
        common: dict[str, Any] = {
            "sae": SAES[site], "pki": str(self.state / "pki"),
            "kme": f"https://{lab.addresses[site]}:8443",
            "tun": {"name": "scada0", "address": f"{tunnel_ip(site)}/24"},
            "listen": {"host": "0.0.0.0", "port": UDP_PORT},
            "metrics": {"host": "0.0.0.0", "port": METRICS_PORT},
            "keys": self.keys,
        }
        if site == "cc":
            cfg = common | {"role": "control-centre", "substations": [
                {"pair": n, "sae": SAES[f"sub{n}"],
                 "endpoint": f"{lab.addresses[f'sub{n}']}:{UDP_PORT}",
                 "control": f"{lab.addresses[f'sub{n}']}:{CONTROL_PORT}",
                 "routes": [f"10.99.{n}.0/24"]} for n in self.substations]}
        else:
            cfg = common | {"role": "substation", "control_centre": {
                "pair": int(site.removeprefix("sub")), "sae": "SAE_CC",
                "endpoint": f"{lab.addresses['cc']}:{UDP_PORT}",
                "control_listen": {"host": "0.0.0.0", "port": CONTROL_PORT},
                "routes": ["10.99.0.0/24"]}}
            if self.modbus is not None:
                cfg["modbus"] = self.modbus
        path = self.tmp / f"scada-{site}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def start_kme(self, site: str) -> None:
        self.lab.start(f"kme-{site}", [PY, "-m", "qgw", "kme", "serve", "--config",
                                       str(self.endpoints[SITES[site]].config)],
                       env=None, ns_of=site)

    def start_kmes(self, sites: Iterable[str] = tuple(SITES)) -> None:
        for site in sites:
            self.start_kme(site)

    def start_gateway(self, site: str) -> None:
        self.lab.start(f"gw-{site}", [PY, "-m", "qgw", "gateway", "scada", "--config",
                                      str(self.configs[site]), "--status-every", "1"],
                       env=None, ns_of=site)

    def stop_gateway(self, site: str, sig: int = signal.SIGTERM) -> None:
        self.lab.kill(f"gw-{site}", sig)

    def run(self, site: str, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        return self.lab.output(site, argv, timeout_s)

    def reach(self, site: str, host: str, port: int) -> bool:
        """A TCP connection from `site` to host:port succeeds (through the tunnel)."""
        code = (f"import socket; socket.create_connection(({host!r}, {port}), timeout=1)"
                ".close()")
        return self.run(site, [PY, "-c", code], 10).returncode == 0

    def wait_reach(self, site: str, host: str, port: int, timeout_s: float = 30) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.reach(site, host, port):
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(f"{site} cannot reach {host}:{port} through the tunnel after "
                             f"{timeout_s} s:\n" + "\n".join(
                                 f"--- {p}:\n{self.lab.tail(p)}" for p in self.lab.procs))

    def metrics(self, site: str) -> str:
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        out = self.run(site, [PY, "-c", f"import urllib.request as u; "
                                        f"print(u.urlopen({url!r}, timeout=5).read().decode())"],
                       20)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def samples(self, site: str) -> dict[str, float]:
        return prometheus_samples(self.metrics(site))

    def metric(self, site: str, name: str, **labels: str) -> float:
        """One metric of a site's gateway, summed over the samples matching `labels`."""
        return metric_value(self.metrics(site), name, **labels)
