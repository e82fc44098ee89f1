"""A service chain in namespaces (demo, benchmark, tests): client -> ingress -> SF1 -> SF2 ->
egress -> server, each node running `qgw gateway opot`, two KMEs keying the links.

Every namespace has `eth0` on the lab's bridge (management: KMEs, key sessions, profiles);
the data path is a line of veth pairs: client:data <-> ingress:left, ingress:right <->
sf1:left, ..., egress:right <-> server:data. Client 10.88.0.1 and server 10.88.0.2 share
a subnet: the chain is transparent at layer 2.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kme.network import prepare
from kme.topology import Topology
from qgw.netlab import Lab, metric_value

PY = sys.executable
NODES = ["INGRESS", "SF1", "SF2", "EGRESS"]
KME_OF = {"INGRESS": "KME_A", "SF1": "KME_B", "SF2": "KME_A", "EGRESS": "KME_B"}
SERVICES = ["kme-a", "kme-b", "ingress", "sf1", "sf2", "egress", "client", "server"]
CLIENT_IP, SERVER_IP = "10.88.0.1", "10.88.0.2"
LINK_PORT, PROFILE_PORT, METRICS_PORT = 7201, 7301, 9700
TOPOLOGY = Topology.model_validate({
    "name": "opot",
    "nodes": {"KME_A": {}, "KME_B": {}},
    "links": [{"a": "KME_A", "b": "KME_B", "loss_db": 1, "key_rate_bps": 1e6}],
    "saes": {f"SAE_{n}": k for n, k in KME_OF.items()},
})


def ns_name(node: str) -> str:
    return node.lower()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


# Run in a namespace: no IPv6 chatter on the chain's interfaces, and checksums computed by
# the sender's kernel (veth offloads them otherwise: a frame a node forwards through an
# AF_PACKET socket would reach the host with a TCP checksum never filled in; real NICs
# deliver complete frames). SIOCETHTOOL / ETHTOOL_STXCSUM without needing ethtool(8).
_PREPARE = """
import ctypes, fcntl, socket, struct, sys
for name in sys.argv[1:]:
    open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w").write("1")
    value = ctypes.create_string_buffer(struct.pack("II", 0x17, 0))
    with socket.socket() as s:
        fcntl.ioctl(s, 0x8946, struct.pack("16sP", name.encode(), ctypes.addressof(value)))
"""


class OpotLab:
    def __init__(self, lab: Lab, tmp: Path, *, ordered: bool = True,
                 keys: dict[str, Any] | None = None, rotate_s: float = 60.0,
                 overlap_s: float = 2.0) -> None:
        self.lab = lab
        self.tmp = tmp
        lab.setup(SERVICES)
        self._chain()
        self.state = tmp / "state"
        self.endpoints = prepare(self.state, TOPOLOGY.to_spec(),
                                 hosts={"KME_A": lab.addresses["kme-a"],
                                        "KME_B": lab.addresses["kme-b"]})
        self.keys = keys or {"rekey_interval_s": 30}
        self.rotate_s = rotate_s
        self.overlap_s = overlap_s
        self.configs = {n: self.write_config(n, ordered) for n in NODES}

    def _chain(self) -> None:
        """The data path: one veth pair per hop, no addresses on the nodes' ends."""
        hops = [("client", "data"), *[(ns_name(n), side) for n in NODES
                                      for side in ("left", "right")], ("server", "data")]
        for i in range(0, len(hops), 2):
            (a, a_if), (b, b_if) = hops[i], hops[i + 1]
            ns_a, ns_b = self.lab.namespaces[a], self.lab.namespaces[b]
            _ip("-n", ns_a, "link", "add", a_if, "type", "veth", "peer", "name", b_if,
                "netns", ns_b)
            for ns, ifname in ((ns_a, a_if), (ns_b, b_if)):
                # NSH adds 54 bytes inside the chain; hosts keep the usual 1500.
                _ip("-n", ns, "link", "set", ifname, "mtu", "1600", "up")
        for host, addr in (("client", CLIENT_IP), ("server", SERVER_IP)):
            ns = self.lab.namespaces[host]
            _ip("-n", ns, "link", "set", "data", "mtu", "1500")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "data")
        for svc, names in [("client", ["data"]), ("server", ["data"]),
                           *[(ns_name(n), ["left", "right"]) for n in NODES]]:
            subprocess.run(["ip", "netns", "exec", self.lab.namespaces[svc], PY, "-c",
                            _PREPARE, *names], check=True, capture_output=True, timeout=20)

    def write_config(self, node: str, ordered: bool) -> Path:
        lab, where = self.lab, NODES.index(node)
        cfg: dict[str, Any] = {
            "role": "ingress" if where == 0 else "egress" if where == len(NODES) - 1
            else "transit",
            "node": node,
            "path": {"id": "chain1", "spi": 42, "nodes": NODES, "ordered": ordered},
            "sae": f"SAE_{node}", "pki": str(self.state / "pki"),
            "kme": f"https://{lab.addresses['kme-a' if KME_OF[node] == 'KME_A' else 'kme-b']}"
                   f":8443",
            "interfaces": {"left": "left", "right": "right"},
            "keys": self.keys,
            "metrics": {"host": "0.0.0.0", "port": METRICS_PORT},
        }
        if where > 0:
            cfg["upstream"] = {"sae": f"SAE_{NODES[where - 1]}",
                               "listen": {"host": "0.0.0.0", "port": LINK_PORT}}
        if where < len(NODES) - 1:
            nxt = NODES[where + 1]
            cfg["downstream"] = {"sae": f"SAE_{nxt}",
                                 "connect": f"{lab.addresses[ns_name(nxt)]}:{LINK_PORT}"}
        if node == "EGRESS":
            cfg["controller"] = {"rotate_s": self.rotate_s, "overlap_s": self.overlap_s,
                                 "nodes": [{"node": n, "sae": f"SAE_{n}",
                                            "address": f"{lab.addresses[ns_name(n)]}:"
                                                       f"{PROFILE_PORT}"}
                                           for n in NODES[:-1]]}
        else:
            cfg["controller_sae"] = "SAE_EGRESS"
            cfg["profiles_listen"] = {"host": "0.0.0.0", "port": PROFILE_PORT}
        path = self.tmp / f"opot-{node.lower()}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def start_kmes(self) -> None:
        for kme, svc in (("KME_A", "kme-a"), ("KME_B", "kme-b")):
            self.lab.start(svc, [PY, "-m", "qgw", "kme", "serve", "--config",
                                 str(self.endpoints[kme].config)], env=None)

    def start_node(self, node: str) -> None:
        self.lab.start(ns_name(node), [PY, "-m", "qgw", "gateway", "opot", "--config",
                                       str(self.configs[node]), "--status-every", "1"],
                       env=None)

    def start_http(self) -> None:
        """The server the round trips are measured against (TCP connect to port 8000)."""
        if "http" not in self.lab.procs:
            self.lab.start("http", [PY, "-m", "http.server", "8000", "--bind", SERVER_IP],
                           env=None, ns_of="server")

    def start(self) -> None:
        self.start_kmes()
        self.start_http()
        for node in reversed(NODES):
            self.start_node(node)

    def forwarding(self) -> list[str]:
        """Every node a plain forwarder (the data plane's `forward` role), no proof and no
        keys: the same chain as the baseline for what OPoT adds. Returns the services, to
        `lab.kill` before `start`."""
        services = []
        for node in NODES:
            svc = f"forward-{ns_name(node)}"
            self.lab.start(svc, [PY, "-m", "gateways.opot.dataplane", "--role", "forward",
                                 "--left", "left", "--right", "right", "--spi", "42"],
                           env=None, ns_of=ns_name(node))
            services.append(svc)
        deadline = time.monotonic() + 30
        for svc in services:
            while '"ready"' not in self.lab.tail(svc):
                if time.monotonic() > deadline or self.lab.procs[svc].poll() is not None:
                    raise RuntimeError(f"{svc} did not start:\n{self.lab.tail(svc)}")
                time.sleep(0.1)
        return services

    def run(self, service: str, argv: list[str], timeout_s: float) -> \
            subprocess.CompletedProcess[str]:
        return self.lab.output(service, argv, timeout_s)

    def metrics(self, node: str) -> str:
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        out = self.run(ns_name(node), [PY, "-c", f"import urllib.request as u; print(u.urlopen("
                                                 f"{url!r}, timeout=5).read().decode())"], 20)
        if out.returncode != 0:
            raise RuntimeError(f"metrics of {node}: {out.stderr[-300:]}")
        return out.stdout

    def metric(self, node: str, name: str, **labels: str) -> float:
        return metric_value(self.metrics(node), name, **labels)

    def wait_ready(self, timeout_s: float = 45.0) -> float:
        """Until the controller rotated a profile in and a TCP connection crosses the chain."""
        started = time.monotonic()
        probe = (f"import socket; socket.create_connection(({SERVER_IP!r}, 8000), "
                 f"timeout=1).close()")
        while time.monotonic() - started < timeout_s:
            if self.run("client", [PY, "-c", probe], 10).returncode == 0:
                return time.monotonic() - started
            time.sleep(0.3)
        raise AssertionError("the chain did not carry a connection in time:\n" + "\n".join(
            f"--- {p}:\n{self.lab.tail(p)}" for p in self.lab.procs))
