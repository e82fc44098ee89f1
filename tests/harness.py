"""Test harness: KMEs running in this process on a background event loop.

Real TLS on loopback, real SQLite stores, the same code as `qgw kme serve`;
only the process boundary is left out (tests/kme/test_crash.py keeps it).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from keyclient import Etsi014Client
from kme.config import KmeConfig
from kme.server import KmeServer
from kme.topology import Topology
from qgw.pki import KmeSpec, Pki, SaeSpec, init_pki
from qgw.ports import free_ports

T = TypeVar("T")

SAES = {"SAE_1": "KME_A", "SAE_2": "KME_B", "SAE_3": "KME_B", "SAE_4": "KME_A",
        "SAE_9": "KME_C"}


def free_port() -> int:
    return free_ports(1)[0]


def make_pki(root: Path) -> Pki:
    init_pki(root, [KmeSpec.parse(k) for k in ("KME_A", "KME_B", "KME_C")],
             [SaeSpec(s, k) for s, k in SAES.items()])
    return Pki(root)


class Loop:
    """An asyncio loop in a daemon thread, for servers the test talks to synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            import io
            out = io.StringIO()
            for task in asyncio.all_tasks(self.loop):
                task.print_stack(file=out)
            raise TimeoutError(f"KME loop stuck; tasks:\n{out.getvalue()}") from None

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()
        # A server stopped while a client still held an idle TLS connection is waiting for
        # that client's close_notify (asyncio's 30 s SSL shutdown); stopping the loop
        # abandons those transports. A KME process simply exits; here they are collected
        # now, so their ResourceWarning does not land in an unrelated later test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


class KmePair:
    """KME_A and KME_B joined by one simulated link."""

    def __init__(self, tmp: Path, pki: Pki, *, rate_bps: float = 1e6,
                 limits: dict[str, int] | None = None, peer_timeout_s: float = 2.0,
                 tick_s: float = 0.02) -> None:
        self.tmp = tmp
        self.pki = pki
        self.loop = Loop()
        self.ports = {"KME_A": free_port(), "KME_B": free_port()}
        self.metrics_ports = {"KME_A": free_port(), "KME_B": free_port()}
        self.servers: dict[str, KmeServer] = {}
        self.configs = {
            kme: self._config(kme, peer, rate_bps, limits or {}, peer_timeout_s, tick_s)
            for kme, peer in (("KME_A", "KME_B"), ("KME_B", "KME_A"))
        }
        self.clients: list[Etsi014Client] = []
        self._cleanups: list[Callable[[], object]] = []

    def _config(self, kme: str, peer: str, rate: float, limits: dict[str, int],
                peer_timeout_s: float, tick_s: float) -> KmeConfig:
        f = self.pki.kme_files(kme)
        return KmeConfig.model_validate({
            "kme_id": kme,
            "listen": {"host": "127.0.0.1", "port": self.ports[kme]},
            "metrics": {"host": "127.0.0.1", "port": self.metrics_ports[kme]},
            "tls": {"ca": f.ca, "cert": f.cert, "key": f.key},
            "store": self.tmp / f"{kme}.sqlite",
            "saes": SAES,
            "links": [{"peer": peer, "url": f"https://localhost:{self.ports[peer]}",
                       "key_rate_bps": rate}],
            "limits": limits,
            "peer_timeout_s": peer_timeout_s,
            "tick_s": tick_s,
        })

    def url(self, kme: str) -> str:
        return f"https://localhost:{self.ports[kme]}"

    def start(self, *kmes: str) -> KmePair:
        for kme in kmes or ("KME_A", "KME_B"):
            server = KmeServer(self.configs[kme])
            self.loop.run(server.start())
            self.servers[kme] = server
        return self

    def stop(self, *kmes: str) -> None:
        for kme in kmes or tuple(self.servers):
            server = self.servers.pop(kme, None)
            if server is not None:
                self.loop.run(server.stop())

    def client(self, sae: str, **kwargs: Any) -> Etsi014Client:
        kme = SAES[sae]
        c = Etsi014Client(self.url(kme), self.pki.sae_files(sae), **kwargs)
        self.clients.append(c)
        return c

    def wait_for_keys(self, count: int = 8, timeout_s: float = 10.0) -> None:
        a = self.client("SAE_1")
        b = self.client("SAE_2")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if min(a.status("SAE_2").stored_key_count,
                   b.status("SAE_1").stored_key_count) >= count:
                return
            time.sleep(0.02)
        raise AssertionError(f"link did not deliver {count} keys in {timeout_s} s")

    def on_close(self, fn: Callable[[], object]) -> None:
        self._cleanups.append(fn)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for fn in self._cleanups:
            fn()
        self.stop()
        self.loop.close()


class KmeNet:
    """Every KME of a topology in this process, on loopback, each with its own port."""

    def __init__(self, tmp: Path, topology: Topology, *, rates: dict[str, float] | None = None,
                 peer_timeout_s: float = 2.0, tick_s: float = 0.02,
                 limits: dict[str, int] | None = None) -> None:
        self.tmp = tmp
        self.topology = topology
        init_pki(tmp / "pki", [KmeSpec.parse(k) for k in topology.nodes],
                 [SaeSpec(s, k) for s, k in topology.saes.items()])
        self.pki = Pki(tmp / "pki")
        self.loop = Loop()
        nodes = list(topology.nodes)
        ports = free_ports(2 * len(nodes))
        self.ports = dict(zip(nodes, ports[:len(nodes)], strict=True))
        self.metrics_ports = dict(zip(nodes, ports[len(nodes):], strict=True))
        self.servers: dict[str, KmeServer] = {}
        self.configs: dict[str, KmeConfig] = {}
        for kme in nodes:
            links = []
            for link in topology.links:
                if kme in (link.a, link.b):
                    peer = link.b if kme == link.a else link.a
                    rate = (rates or {}).get(f"{link.a}-{link.b}", link.rate_bps)
                    links.append({"peer": peer, "url": f"https://localhost:{self.ports[peer]}",
                                  "key_rate_bps": rate})
            f = self.pki.kme_files(kme)
            self.configs[kme] = KmeConfig.model_validate({
                "kme_id": kme,
                "listen": {"host": "127.0.0.1", "port": self.ports[kme]},
                "metrics": {"host": "127.0.0.1", "port": self.metrics_ports[kme]},
                "tls": {"ca": f.ca, "cert": f.cert, "key": f.key},
                "store": tmp / f"{kme}.sqlite",
                "saes": dict(topology.saes),
                "links": links,
                "limits": limits or {},
                "peer_timeout_s": peer_timeout_s,
                "tick_s": tick_s,
            })
        self.clients: list[Etsi014Client] = []

    def start(self) -> KmeNet:
        for kme, cfg in self.configs.items():
            server = KmeServer(cfg)
            self.loop.run(server.start())
            self.servers[kme] = server
        return self

    def kme(self, kme_id: str) -> Any:
        return self.servers[kme_id].kme

    def client(self, sae: str, **kwargs: Any) -> Etsi014Client:
        kme = self.topology.saes[sae]
        c = Etsi014Client(f"https://localhost:{self.ports[kme]}", self.pki.sae_files(sae),
                          **kwargs)
        self.clients.append(c)
        return c

    def wait(self, check: Callable[[], bool], timeout_s: float = 15.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what or check}")

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for server in self.servers.values():
            self.loop.run(server.stop())
        self.servers.clear()
        self.loop.close()
