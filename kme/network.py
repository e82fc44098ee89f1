"""A whole simulated QKD network on one machine: PKI, one config and one process per KME.

The embedded default mirrors the link OPENQKD use case 35 ran on: Norte and
Distrito in the Madrid network, 10.2 dB of channel loss, 8.4 kbit/s of secret
key measured by use case 33. Two KMEs, two SAEs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import yaml

from qgw.errors import QgwError
from qgw.pki import KmeSpec, Pki, SaeSpec, init_pki, kme_dns_name


@dataclass(frozen=True)
class LinkSpec:
    a: str
    b: str
    key_rate_bps: float | None = None
    loss_db: float = 10.0


@dataclass
class NetworkSpec:
    kmes: list[str]
    saes: dict[str, str]
    links: list[LinkSpec]
    limits: dict[str, int] = field(default_factory=dict)
    name: str = "default"


def default_network() -> NetworkSpec:
    return NetworkSpec(
        kmes=["KME_A", "KME_B"],
        saes={"SAE_1": "KME_A", "SAE_2": "KME_B"},
        # UC33: Norte -> Distrito, 10.2 dB, 8.4e3 b/s (the link UC35's IoT trial used)
        links=[LinkSpec("KME_A", "KME_B", key_rate_bps=8400.0, loss_db=10.2)],
    )


@dataclass(frozen=True)
class KmeEndpoint:
    kme_id: str
    url: str
    config: Path
    metrics_url: str


def prepare(state: Path, spec: NetworkSpec, base_port: int = 8443,
            metrics_base_port: int = 9443, *, dns: bool = False,
            hosts: dict[str, str] | None = None,
            only: str | None = None) -> dict[str, KmeEndpoint]:
    """Write the PKI (kept if present) and a config per KME under `state`.

    By default every KME listens on 127.0.0.1 with its own ports (one machine).
    With `dns` each KME listens on all addresses at `base_port` and reaches its
    peers by their DNS names (kme-norte...), one container or namespace per KME.
    `hosts` does the same with given addresses (one network namespace per KME).
    `only` writes just that KME's config (a container preparing its own node).
    """
    if dns:
        hosts = {k: kme_dns_name(k) for k in spec.kmes}
    state = state.resolve()
    if only is not None and only not in spec.kmes:
        raise QgwError(f"{only} is not a node of network {spec.name!r}; its nodes: "
                       f"{', '.join(spec.kmes)}")
    names = hosts or {}
    init_pki(state / "pki", [KmeSpec.parse(f"{k}={names[k]}" if k in names else k)
                             for k in spec.kmes],
             [SaeSpec(s, k) for s, k in spec.saes.items()])
    pki = Pki(state / "pki")
    spread = hosts is not None
    ports = {k: base_port + (0 if spread else i) for i, k in enumerate(spec.kmes)}
    mports = {k: metrics_base_port + (0 if spread else i) for i, k in enumerate(spec.kmes)}
    host = dict(hosts) if hosts is not None else {k: "127.0.0.1" for k in spec.kmes}
    endpoints = {}
    for kme in spec.kmes:
        files = pki.kme_files(kme)
        links = []
        for link in spec.links:
            if kme not in (link.a, link.b):
                continue
            peer = link.b if kme == link.a else link.a
            entry: dict[str, object] = {"peer": peer,
                                        "url": f"https://{host[peer]}:{ports[peer]}",
                                        "loss_db": link.loss_db}
            if link.key_rate_bps is not None:
                entry["key_rate_bps"] = link.key_rate_bps
            links.append(entry)
        listen = "0.0.0.0" if spread else "127.0.0.1"
        cfg: dict[str, object] = {
            "kme_id": kme,
            "listen": {"host": listen, "port": ports[kme]},
            "metrics": {"host": listen, "port": mports[kme]},
            "tls": {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)},
            "store": str(state / "store" / f"{kme}.sqlite"),
            "saes": dict(spec.saes),
            "links": links,
        }
        if spec.limits:
            cfg["limits"] = dict(spec.limits)
        path = state / "config" / f"{kme}.yaml"
        if only is None or only == kme:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
            tmp.replace(path)
        local = host[kme] if spread else "localhost"
        endpoints[kme] = KmeEndpoint(kme, f"https://{local}:{ports[kme]}", path,
                                     f"http://{host[kme] if spread else '127.0.0.1'}:"
                                     f"{mports[kme]}")
    return endpoints


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel SIGTERM the child when this process dies, even by
    SIGKILL, so no KME outlives its launcher. None where that cannot be relied on.

    Linux only. The signal follows the *thread* that forked the child, so it is used only
    from the main thread (a worker thread ending would otherwise stop the KMEs it started).
    """
    if not sys.platform.startswith("linux") or \
            threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no locks, no logging
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalNetwork:
    """Runs every KME of a prepared network as its own process (`qgw kme serve`)."""

    def __init__(self, endpoints: dict[str, KmeEndpoint], log_dir: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.endpoints = endpoints
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start_kme(self, kme_id: str, timeout_s: float = 20.0) -> None:
        ep = self.endpoints[kme_id]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{kme_id}.log", "ab")  # noqa: SIM115 (handed to the child)
        env = dict(os.environ, **self.extra_env)
        proc = subprocess.Popen(
            [sys.executable, "-m", "qgw", "kme", "serve", "--config", str(ep.config)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        log.close()
        self.procs[kme_id] = proc
        port = int(ep.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout_s
        while not _port_open(port):
            if proc.poll() is not None:
                tail = (self.log_dir / f"{kme_id}.log").read_text()[-2000:]
                raise QgwError(f"KME {kme_id} exited with code {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise QgwError(f"KME {kme_id} did not open port {port} in {timeout_s:.0f} s")
            time.sleep(0.05)

    def start(self) -> LocalNetwork:
        try:
            for kme in self.endpoints:
                self.start_kme(kme)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, kme_id: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(kme_id)
        proc.send_signal(sig)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> LocalNetwork:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
