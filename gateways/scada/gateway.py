"""The SCADA gateway: a QKD-keyed layer-3 tunnel between a control centre and substations.

One process per site. The control centre holds one gateway pair per
substation (hub and spoke), each with its own `KeySession`, its own keys and
its own `PairKeys`; a substation holds one pair. The data plane is
`gateways.scada.tunnel`; the optional Modbus policy is `gateways.scada.modbus`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateways.base import GatewayState, ThreadedGateway
from gateways.config import serve_metrics
from gateways.scada.config import ScadaConfig
from gateways.scada.keys import PairKeys, Side
from gateways.scada.modbus import ModbusFilter
from gateways.scada.tun import configure, open_tun
from gateways.scada.tunnel import KEEPALIVE_S, Address, Route, Tunnel
from keyclient import Etsi014Client
from keyclient.control import TlsControlChannel
from keyclient.metrics import register_session
from keyclient.session import KeySession, Role, SessionState
from qgw.pki import Pki

log = logging.getLogger("qgw.gateway.scada")

SOCKET_BUFFER = 4 << 20


class ScadaGateway(ThreadedGateway):
    name = "scada"
    summary = "QKD-keyed tunnel for Modbus/TCP between control centre and substations"

    def __init__(self, cfg: ScadaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.side = Side.CONTROL_CENTRE if cfg.role == "control-centre" else Side.SUBSTATION
        self.pairs: dict[int, PairKeys] = {}
        self.sessions: dict[int, KeySession] = {}
        self.tunnel: Tunnel | None = None
        self.registry = CollectorRegistry()
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self._kme: Etsi014Client | None = None
        self._stop_metrics: Callable[[], None] = lambda: None

    # -- lifecycle -------------------------------------------------------------------


    def open(self) -> None:
        """Bring up TUN device, UDP socket, data plane and one key session per pair."""
        cfg = self.cfg
        self.state = GatewayState.STARTING
        files = Pki(cfg.pki).sae_files(cfg.sae)
        try:
            routes, endpoints, peers = self._layout()
            self._fd, tun_name = open_tun(cfg.tun.name)
            configure(tun_name, cfg.tun.address, cfg.tun.mtu, [r.network for r in routes])
            self._sock = self._bind()
            policy = ModbusFilter(cfg.modbus) if cfg.modbus is not None else None
            self.pairs = {pair: PairKeys(pair, self.side) for pair in peers}
            self.tunnel = Tunnel(self._fd, self._sock, self.pairs,
                                 routes if self.side is Side.CONTROL_CENTRE else [],
                                 endpoints, policy,
                                 learn_endpoints=self.side is Side.CONTROL_CENTRE,
                                 keepalive_s=KEEPALIVE_S if self.side is Side.SUBSTATION
                                 else None)
            self._kme = Etsi014Client(cfg.kme, files)
            for pair, (peer_sae, control) in peers.items():
                channel = TlsControlChannel(
                    files, peer_sae,
                    connect=control if self.side is Side.CONTROL_CENTRE else None,
                    listen=control if self.side is Side.SUBSTATION else None)
                session = KeySession(
                    Role.MASTER if self.side is Side.CONTROL_CENTRE else Role.SLAVE,
                    kme=self._kme, local_sae=cfg.sae, peer_sae=peer_sae, channel=channel,
                    installer=self.pairs[pair], policy=cfg.keys)
                self.sessions[pair] = session
                register_session(session, self.registry, gateway="scada")
            self.registry.register(_TunnelCollector(self))
            self.tunnel.start()
            for session in self.sessions.values():
                session.start()
            self._stop_metrics = serve_metrics(cfg.metrics, self.registry)
        except BaseException:
            self.close()
            raise
        self.state = GatewayState.RUNNING
        log.info("SCADA gateway %s (%s) up: TUN %s, UDP %s:%d, %d pair(s)", cfg.sae, cfg.role,
                 tun_name, cfg.listen.host, self._sock.getsockname()[1], len(self.pairs))

    def close(self) -> None:
        """Stop sessions and data plane; the TUN device goes with its descriptor."""
        self.state = GatewayState.STOPPING
        for session in self.sessions.values():
            session.stop()
        if self.tunnel is not None:
            self.tunnel.stop()
        for pair in self.pairs.values():
            pair.invalidate("gateway stopped")
        self._stop_metrics()
        self._stop_metrics = lambda: None
        if self._kme is not None:
            self._kme.close()
        if self._sock is not None:
            self._sock.close()
        if self._fd is not None:
            import os

            os.close(self._fd)
        self._fd = self._sock = self._kme = None
        self.state = GatewayState.STOPPED

    def _layout(self) -> tuple[list[Route], dict[int, Address | None],
                               dict[int, tuple[str, tuple[str, int]]]]:
        """Routes into the tunnel, peer endpoints, and (peer SAE, control address) per pair."""
        cfg = self.cfg
        routes: list[Route] = []
        endpoints: dict[int, Address | None] = {}
        peers: dict[int, tuple[str, tuple[str, int]]] = {}
        if self.side is Side.CONTROL_CENTRE:
            for sub in cfg.substations:
                routes += [Route(net, sub.pair) for net in sub.routes]
                endpoints[sub.pair] = _resolve(cfg.endpoint(sub.endpoint)) \
                    if sub.endpoint else None
                peers[sub.pair] = (sub.sae, cfg.endpoint(sub.control))
        else:
            cc = cfg.control_centre
            assert cc is not None
            routes = [Route(net, cc.pair) for net in cc.routes]
            endpoints[cc.pair] = _resolve(cfg.endpoint(cc.endpoint))
            peers[cc.pair] = (cc.sae, (cc.control_listen.host, cc.control_listen.port))
        return routes, endpoints, peers

    def _bind(self) -> socket.socket:
        host = self.cfg.listen.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        sock.bind((host, self.cfg.listen.port))
        return sock

    # -- status ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.cfg.role, "sae": self.cfg.sae,
                               "state": self.overall_state().value, "pairs": {}}
        for pair, keys in self.pairs.items():
            session = self.sessions.get(pair)
            st = session.status() if session is not None else None
            out["pairs"][pair] = {
                "peer": session.peer_sae if session is not None else None,
                "session": st.state.value if st is not None else None,
                "epoch": keys.active_epoch,
                "key_source": keys.source,
                "rekeys": keys.rekeys,
                "fail_closed": keys.closed_reason,
                "dropped": dict(keys.drops),
            }
        if self.tunnel is not None:
            t = self.tunnel.traffic
            out["traffic"] = {"sent_packets": t.sent_packets, "sent_bytes": t.sent_bytes,
                              "received_packets": t.received_packets,
                              "received_bytes": t.received_bytes, "dropped": dict(t.drops)}
            if self.tunnel.policy is not None:
                out["modbus"] = self.tunnel.policy.stats()
        return out

    def overall_state(self) -> GatewayState:
        if self.state is not GatewayState.RUNNING:
            return self.state
        protected = [k.active_epoch is not None for k in self.pairs.values()]
        if all(protected):
            return GatewayState.RUNNING
        if not any(protected) and any(s.status().state is SessionState.FAILED_CLOSED
                                      for s in self.sessions.values()):
            return GatewayState.FAILED_CLOSED
        return GatewayState.DEGRADED


def _resolve(addr: tuple[str, int]) -> Address:
    """A literal address as is; a host name looked up once at start."""
    host, port = addr
    try:
        ipaddress.ip_address(host)
        return host, port
    except ValueError:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        return str(info[0][4][0]), port


class _TunnelCollector(Collector):
    def __init__(self, gw: ScadaGateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        tunnel = self.gw.tunnel
        if tunnel is None:
            return
        t = tunnel.traffic
        for name, doc, value in (
                ("qgw_scada_sent_packets", "Packets sealed and sent into the tunnel",
                 t.sent_packets),
                ("qgw_scada_sent_bytes", "Plain bytes protected outbound", t.sent_bytes),
                ("qgw_scada_received_packets", "Authentic packets delivered to the site",
                 t.received_packets),
                ("qgw_scada_received_bytes", "Plain bytes delivered inbound", t.received_bytes)):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c
        drops = CounterMetricFamily("qgw_scada_dropped_packets", "Packets dropped, by reason",
                                    labels=["pair", "reason"])
        for reason, n in t.drops.items():
            drops.add_metric(["", reason], n)
        for pair, keys in self.gw.pairs.items():
            for reason, n in keys.drops.items():
                drops.add_metric([str(pair), reason], n)
        yield drops
        protected = GaugeMetricFamily("qgw_scada_pair_protected",
                                      "1 while a key protects the pair's traffic", labels=["pair"])
        for pair, keys in self.gw.pairs.items():
            protected.add_metric([str(pair)], 0.0 if keys.active_epoch is None else 1.0)
        yield protected
