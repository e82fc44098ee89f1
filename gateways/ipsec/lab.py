"""Two sites joined by an IPsec gateway pair, in namespaces (kernel tests, demo, benchmark).

    site-a 10.1.0.2 --lan-- 10.1.0.1 gw-a 10.77.0.11 ==ESP==
                            10.77.0.12 gw-b 10.2.0.1 --lan-- 10.2.0.2 site-b

The gateways' namespaces sit on the lab's bridge (the transit link, where
only ESP should be seen between the subnets); each also runs its site's KME
(KME_A, KME_B, one QKD link). The site hosts are reachable only through
their gateway. Needs a kernel with ESP (`qgw.kernelvm` boots one where the
host's has none).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kme.network import prepare
from kme.topology import Topology
from qgw.netlab import Lab, prometheus_samples

PY = sys.executable
SERVICES = ["site-a", "gw-a", "gw-b", "site-b"]
SUBNET = {"a": "10.1.0", "b": "10.2.0"}
SAE = {"a": "SAE_A", "b": "SAE_B"}
KME = {"a": "KME_A", "b": "KME_B"}
CONTROL_PORT = 7201
METRICS_PORT = 9610
STREAM_PORT = 9000
IDLE_S = 5  # the stream receiver's silence after its first datagram that ends it
TOPOLOGY = Topology.model_validate({
    "name": "ipsec",
    "nodes": {"KME_A": {}, "KME_B": {}},
    "links": [{"a": "KME_A", "b": "KME_B", "loss_db": 1, "key_rate_bps": 1e6}],
    "saes": {"SAE_A": "KME_A", "SAE_B": "KME_B"},
})
REQID = 0x51D0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def host_ip(site: str) -> str:
    return f"{SUBNET[site]}.2"


class IpsecLab:
    def __init__(self, lab: Lab, tmp: Path, keys: dict[str, Any] | None = None,
                 lifetime: dict[str, Any] | None = None) -> None:
        self.lab = lab
        self.tmp = tmp
        lab.setup(SERVICES)
        self._sites()
        self.state = tmp / "state"
        self.endpoints = prepare(self.state, TOPOLOGY.to_spec(),
                                 hosts={KME[s]: lab.addresses[f"gw-{s}"] for s in "ab"})
        self.keys = keys or {"rekey_interval_s": 10}
        self.lifetime = lifetime
        self.configs = {s: self.write_config(s) for s in "ab"}
        self.streams = 0

    def _sites(self) -> None:
        """Take the site hosts off the bridge; give each a LAN to its gateway only."""
        lab = self.lab
        for s in "ab":
            site, gw = lab.namespaces[f"site-{s}"], lab.namespaces[f"gw-{s}"]
            _ip("-n", site, "addr", "flush", "dev", "eth0")
            _ip("-n", site, "link", "set", "eth0", "down")
            _ip("-n", gw, "link", "add", "lan", "type", "veth", "peer", "name", "lan",
                "netns", site)
            _ip("-n", gw, "addr", "add", f"{SUBNET[s]}.1/24", "dev", "lan")
            _ip("-n", site, "addr", "add", f"{SUBNET[s]}.2/24", "dev", "lan")
            for ns in (gw, site):
                _ip("-n", ns, "link", "set", "lan", "up")
            _ip("-n", site, "route", "add", "default", "via", f"{SUBNET[s]}.1")
            other = "b" if s == "a" else "a"
            _ip("-n", gw, "route", "add", f"{SUBNET[other]}.0/24", "via",
                lab.addresses[f"gw-{other}"])
            subprocess.run(["ip", "netns", "exec", gw, "sysctl", "-qw",
                            "net.ipv4.ip_forward=1"], check=True, capture_output=True,
                           timeout=10)

    def write_config(self, site: str, keys: dict[str, Any] | None = None) -> Path:
        lab, other = self.lab, "b" if site == "a" else "a"
        cfg: dict[str, Any] = {
            "role": "master" if site == "a" else "slave",
            "sae": SAE[site], "pki": str(self.state / "pki"),
            "kme": f"https://{lab.addresses[f'gw-{site}']}:8443",
            "local": lab.addresses[f"gw-{site}"],
            "local_subnets": [f"{SUBNET[site]}.0/24"],
            "peer": {"sae": SAE[other], "address": lab.addresses[f"gw-{other}"],
                     "subnets": [f"{SUBNET[other]}.0/24"]},
            "reqid": REQID,
            "keys": keys if keys is not None else self.keys,
            "metrics": {"host": "0.0.0.0", "port": METRICS_PORT},
        }
        if self.lifetime is not None:
            cfg["lifetime"] = self.lifetime
        if site == "a":
            cfg["peer"]["control"] = f"{lab.addresses['gw-b']}:{CONTROL_PORT}"
        else:
            cfg["control_listen"] = {"host": "0.0.0.0", "port": CONTROL_PORT}
        path = self.tmp / f"ipsec-{site}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def start_kme(self, site: str) -> None:
        self.lab.start(f"kme-{site}", [PY, "-m", "qgw", "kme", "serve", "--config",
                                       str(self.endpoints[KME[site]].config)],
                       env=None, ns_of=f"gw-{site}")

    def start_kmes(self) -> None:
        for site in "ab":
            self.start_kme(site)

    def start_gateway(self, site: str) -> None:
        self.lab.start(f"ipsec-{site}", [PY, "-m", "qgw", "gateway", "ipsec", "--config",
                                         str(self.configs[site]), "--status-every", "1"],
                       env=None, ns_of=f"gw-{site}")

    def start(self) -> None:
        self.start_kmes()
        self.start_gateway("b")
        self.start_gateway("a")

    def run(self, service: str, argv: list[str], timeout_s: float
            ) -> subprocess.CompletedProcess[str]:
        return self.lab.output(service, argv, timeout_s)

    def metrics(self, site: str) -> dict[str, float]:
        """The gateway's Prometheus samples, `name{labels}` -> value."""
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        # busybox's wget starts in milliseconds; a Python interpreter takes seconds in the
        # emulated VM of the kernel tests, and scrapes are frequent.
        fetch = ["busybox", "wget", "-q", "-O", "-", url] if shutil.which("busybox") else \
            [PY, "-c", f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5)"
                       ".read().decode())"]
        out = self.run(f"gw-{site}", fetch, 30)
        if out.returncode != 0:
            raise AssertionError(f"metrics of gw-{site}: {out.stderr}")
        return prometheus_samples(out.stdout)

    def metric(self, site: str, name: str) -> float:
        return sum(v for k, v in self.metrics(site).items()
                   if k == name or k.startswith(name + "{"))

    def wait_protected(self, timeout_s: float = 600) -> float:
        """Seconds until both gateways protect the tunnel (an outbound SA each)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                if all(self.metric(s, "qgw_ipsec_protected") == 1.0 for s in "ab"):
                    return time.monotonic() - started
            except AssertionError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the tunnel is not up after {timeout_s} s:\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(f"--- {p}:\n{self.lab.tail(p)}" for p in self.lab.procs)

    def xfrm_state(self, site: str) -> str:
        """`ip xfrm state` of a gateway (tests only: the product never runs ip xfrm)."""
        return self.run(f"gw-{site}", ["ip", "xfrm", "state"], 10).stdout

    def xfrm_policies(self, site: str) -> str:
        return self.run(f"gw-{site}", ["ip", "xfrm", "policy"], 10).stdout

    def stream(self, count: int, rate: float, size: int = 200,
               timeout_s: float = 600) -> dict[str, Any]:
        """A numbered UDP stream site-a -> site-b through the tunnel; the receiver's counts."""
        self.streams += 1
        name = f"receiver-{self.streams}"
        self.lab.start(name, [PY, "-m", "apps.udpstream", "receive", "--bind",
                                    f"{host_ip('b')}:{STREAM_PORT}", "--idle", str(IDLE_S)],
                       env=None, ns_of="site-b")
        deadline = time.monotonic() + 300   # an interpreter starts slowly under emulation
        while "ready" not in self.lab.tail(name):
            if time.monotonic() > deadline:
                raise AssertionError(f"the stream receiver did not start:\n{self.logs()}")
            time.sleep(0.1)
        sent = self.run("site-a", [PY, "-m", "apps.udpstream", "send", "--to",
                                   f"{host_ip('b')}:{STREAM_PORT}", "--count", str(count),
                                   "--rate", str(rate), "--size", str(size)], timeout_s)
        try:  # the receiver ends IDLE_S after the last datagram...
            self.lab.procs[name].wait(timeout=IDLE_S + 30)
        except subprocess.TimeoutExpired:  # ...or never started counting (a closed tunnel)
            self.lab.kill(name, signal.SIGTERM)
        self.lab.procs.pop(name, None)
        received = json.loads(self.lab.tail(name).strip().splitlines()[-1])
        return {"sender": json.loads(sent.stdout.strip().splitlines()[-1])} | received
