"""A two-party call in network namespaces (namespace tests, the demo, the benchmark).

    call    10.77.0.x  the videocall signalling server (apps.videocall.server)
    part-a  10.77.0.y  KME_A and participant A's gateway (the key master: the camera)
    part-b  10.77.0.z  KME_B and participant B's gateway (the slave)

Media flows between part-a and part-b directly (ICE over the lab's bridge);
keys come from an ETSI 004 stream SAE_A -> SAE_B over the KME pair's link.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kme.network import prepare
from kme.topology import Topology
from qgw.netlab import Lab, prometheus_samples

PY = sys.executable
SERVICES = ["call", "part-a", "part-b"]
SAE = {"a": "SAE_A", "b": "SAE_B"}
KME = {"a": "KME_A", "b": "KME_B"}
SIGNAL_PORT = 8090
CONTROL_PORT = 7301
METRICS_PORT = 9630
TOPOLOGY = Topology.model_validate({
    "name": "webrtc",
    "nodes": {"KME_A": {}, "KME_B": {}},
    "links": [{"a": "KME_A", "b": "KME_B", "loss_db": 1, "key_rate_bps": 1e6}],
    "saes": {"SAE_A": "KME_A", "SAE_B": "KME_B"},
})


class CallLab:
    def __init__(self, lab: Lab, tmp: Path, keys: dict[str, Any] | None = None,
                 video: dict[str, Any] | None = None) -> None:
        self.lab = lab
        self.tmp = tmp
        lab.setup(SERVICES)
        self.state = tmp / "state"
        self.endpoints = prepare(self.state, TOPOLOGY.to_spec(),
                                 hosts={KME[s]: lab.addresses[f"part-{s}"] for s in "ab"})
        self.keys = keys or {"rekey_interval_s": 2.0, "overlap_s": 1.0}
        self.video = video or {"width": 320, "height": 180, "fps": 15}
        self.configs = {s: self.write_config(s) for s in "ab"}

    @property
    def signal_url(self) -> str:
        return f"http://{self.lab.addresses['call']}:{SIGNAL_PORT}"

    def write_config(self, side: str, keys: dict[str, Any] | None = None,
                     name: str | None = None, media: str = "aiortc") -> Path:
        """Side's gateway config; `media: browser` keys a browser page instead of aiortc
        (its key handoff on the namespace's loopback, the page served by `call`)."""
        lab, other = self.lab, "b" if side == "a" else "a"
        cfg: dict[str, Any] = {
            "role": "master" if side == "a" else "slave",
            "sae": SAE[side], "pki": str(self.state / "pki"),
            "kme": f"https://{lab.addresses[f'part-{side}']}:8443",
            "peer": {"sae": SAE[other]},
            "keys": keys if keys is not None else self.keys,
            "call": {"signal": self.signal_url, "room": "lab",
                     "name": name or ("camera" if side == "a" else "viewer")},
            "media": media,
            "video": self.video,
            "metrics": {"host": "0.0.0.0", "port": METRICS_PORT},
        }
        if side == "a":
            cfg["peer"]["control"] = f"{lab.addresses['part-b']}:{CONTROL_PORT}"
        else:
            cfg["control_listen"] = {"host": "0.0.0.0", "port": CONTROL_PORT}
        path = self.tmp / f"webrtc-{side}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def start_kme(self, side: str) -> None:
        self.lab.start(f"kme-{side}", [PY, "-m", "qgw", "kme", "serve", "--config",
                                       str(self.endpoints[KME[side]].config)],
                       env=None, ns_of=f"part-{side}")

    def start_gateway(self, side: str) -> None:
        self.lab.start(f"webrtc-{side}", [PY, "-m", "qgw", "gateway", "webrtc", "--config",
                                          str(self.configs[side]), "--status-every", "1"],
                       env=None, ns_of=f"part-{side}")

    def start(self) -> None:
        self.lab.start("signal", [PY, "-m", "apps.videocall.server", "--host", "0.0.0.0",
                                  "--port", str(SIGNAL_PORT)], env=None, ns_of="call")
        for side in "ab":
            self.start_kme(side)
        self.start_gateway("b")
        self.start_gateway("a")

    def metrics(self, side: str) -> dict[str, float]:
        """The gateway's Prometheus samples, `name{labels}` -> value (empty if not up)."""
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        out = self.lab.output(f"part-{side}", [PY, "-c", "import urllib.request as u; print("
                              f"u.urlopen({url!r}, timeout=5).read().decode())"], 30)
        return prometheus_samples(out.stdout)

    def call_counter(self, side: str, counter: str,
                     samples: dict[str, float] | None = None) -> float:
        samples = samples if samples is not None else self.metrics(side)
        return samples.get(f'qgw_webrtc_call{{counter="{counter}"}}', 0.0)

    def wait_for(self, side: str, counter: str, at_least: float,
                 timeout_s: float = 120) -> dict[str, float]:
        """Poll side's metrics until the call counter reaches `at_least`; the samples then."""
        deadline = time.monotonic() + timeout_s
        samples: dict[str, float] = {}
        while time.monotonic() < deadline:
            samples = self.metrics(side)
            if self.call_counter(side, counter, samples) >= at_least:
                return samples
            time.sleep(0.5)
        raise AssertionError(f"{counter} of part-{side} stayed below {at_least} for "
                             f"{timeout_s} s (last {self.call_counter(side, counter, samples)})"
                             f":\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p}:\n{self.lab.tail(p)}" for p in self.lab.procs)
