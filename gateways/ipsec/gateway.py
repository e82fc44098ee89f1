"""The IPsec gateway: kernel ESP tunnels between two sites, keyed by QKD, no IKE daemon.

Start-up: check the kernel can do ESP with rfc4106(gcm(aes)) (a clear error
naming CONFIG_INET_ESP / CONFIG_CRYPTO_GCM otherwise), remove leftovers this
pair's reqid owns (a crashed run), install the policies (out, in, fwd for
every local x remote subnet, `level required`), then run the KeySession whose
installer (`EspKeys`) adds and deletes SAs. A thread listens to the kernel's
expire events: a soft expiry asks the session for a rekey, a hard one means
the kernel dropped the SA. Stop removes every SA and policy with the reqid.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateways.base import GatewayState, ThreadedGateway
from gateways.config import serve_metrics
from gateways.ipsec.config import IpsecConfig
from gateways.ipsec.keys import Endpoints, EspKeys
from gateways.ipsec.xfrm import Lifetime, Policy, Xfrm, XfrmMonitor
from keyclient import Etsi014Client
from keyclient.control import TlsControlChannel
from keyclient.metrics import register_session
from keyclient.session import KeySession, Role, SessionState
from qgw.pki import Pki

log = logging.getLogger("qgw.gateway.ipsec")


class IpsecGateway(ThreadedGateway):
    name: ClassVar[str] = "ipsec"
    summary: ClassVar[str] = "kernel ESP tunnel between two sites, SAs keyed by QKD (XFRM)"

    def __init__(self, cfg: IpsecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.xfrm: Xfrm | None = None
        self.keys: EspKeys | None = None
        self.session: KeySession | None = None
        self.policies: list[Policy] = []
        self.expires: Counter[str] = Counter()
        self.leftovers = (0, 0)
        self._monitor: XfrmMonitor | None = None
        self._monitor_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._kme: Etsi014Client | None = None
        self._stop_metrics: Callable[[], None] = lambda: None


    def open(self) -> None:
        cfg = self.cfg
        self.state = GatewayState.STARTING
        try:
            self.xfrm = Xfrm()
            self.xfrm.check_support()
            files = Pki(cfg.pki).sae_files(cfg.sae)
            self.leftovers = self.xfrm.flush_owned({cfg.reqid})
            if any(self.leftovers):
                log.warning("removed %d SA(s) and %d policy(ies) left by an earlier run "
                            "(reqid %#x)", *self.leftovers, cfg.reqid)
            self._monitor = XfrmMonitor()
            self._monitor_thread = threading.Thread(target=self._watch_expires, daemon=True,
                                                    name="ipsec-expire")
            self._monitor_thread.start()
            for policy in self._policies():
                self.xfrm.add_policy(policy)
                self.policies.append(policy)
            lt = cfg.lifetime
            self.keys = EspKeys(self.xfrm, Endpoints(
                cfg.role, str(cfg.local), str(cfg.peer.address), cfg.reqid, cfg.replay_window,
                Lifetime(lt.soft_bytes, lt.hard_bytes, lt.soft_s, lt.hard_s)))
            listen = cfg.control_listen
            channel = TlsControlChannel(
                files, cfg.peer.sae, connect=cfg.control_connect,
                listen=(listen.host, listen.port) if listen is not None else None)
            self._kme = Etsi014Client(cfg.kme, files)
            self.session = KeySession(Role(cfg.role), kme=self._kme, local_sae=cfg.sae,
                                      peer_sae=cfg.peer.sae, channel=channel,
                                      installer=self.keys, policy=cfg.keys)
            register_session(self.session, self.registry, gateway="ipsec")
            self.registry.register(_IpsecCollector(self))
            self.session.start()
            self._stop_metrics = serve_metrics(cfg.metrics, self.registry)
        except BaseException:
            self.close()
            raise
        self.state = GatewayState.RUNNING
        log.info("IPsec gateway %s (%s) up: %s <-> %s, %d policies, reqid %#x", cfg.sae,
                 cfg.role, cfg.local, cfg.peer.address, len(self.policies), cfg.reqid)

    def close(self) -> None:
        """Stop the session, then remove every SA and policy of this pair's reqid."""
        self.state = GatewayState.STOPPING
        self._stopping.set()
        if self.session is not None:
            self.session.stop()
        self._stop_metrics()
        self._stop_metrics = lambda: None
        if self.xfrm is not None:
            try:
                sas, policies = self.xfrm.flush_owned({self.cfg.reqid})
                if sas or policies:
                        log.info("removed %d SA(s) and %d policy(ies) (reqid %#x)", sas,
                             policies, self.cfg.reqid)
            finally:
                self.xfrm.close()
        if self._monitor is not None:
            self._monitor.close()
        if self._monitor_thread is not None:
            self._monitor_thread.join(timeout=2)
        if self._kme is not None:
            self._kme.close()
        self.xfrm = self._monitor = self._monitor_thread = self._kme = None
        self.policies = []
        self.state = GatewayState.STOPPED

    def _policies(self) -> list[Policy]:
        cfg = self.cfg
        local, peer = str(cfg.local), str(cfg.peer.address)
        out: list[Policy] = []
        for mine in cfg.local_subnets:
            for theirs in cfg.peer.subnets:
                out.append(Policy(str(mine), str(theirs), "out", local, peer, cfg.reqid,
                                  cfg.priority))
                for direction in ("in", "fwd"):
                    out.append(Policy(str(theirs), str(mine), direction, peer, local,
                                      cfg.reqid, cfg.priority))
        return out

    def _watch_expires(self) -> None:
        monitor = self._monitor
        while monitor is not None and not self._stopping.is_set():
            try:
                events = monitor.read(timeout=0.5)
            except Exception:  # a closed socket at stop, or a kernel hiccup: log, go on
                if self._stopping.is_set():
                    return
                log.exception("reading XFRM expire events failed")
                continue
            for ev in events:
                if ev.reqid != self.cfg.reqid:
                    continue
                self.expires["hard" if ev.hard else "soft"] += 1
                if ev.hard:
                    log.warning("the kernel expired SA spi %#010x (hard lifetime)", ev.spi)
                    if self.keys is not None:
                        self.keys.expired(ev.spi)
                else:
                    log.info("SA spi %#010x reached its soft lifetime: rekeying", ev.spi)
                if self.session is not None:
                    self.session.request_rekey()

    # -- status ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        keys, session = self.keys, self.session
        st = session.status() if session is not None else None
        out: dict[str, Any] = {
            "role": self.cfg.role, "sae": self.cfg.sae, "state": self.overall_state().value,
            "session": st.state.value if st is not None else None,
            "epoch": keys.active_epoch if keys is not None else None,
            "key_source": keys.source if keys is not None else None,
            "rekeys": keys.rekeys if keys is not None else 0,
            "fail_closed": keys.closed_reason if keys is not None else "not started",
            "spis": keys.spis() if keys is not None else {},
            "expires": dict(self.expires),
            "policies": len(self.policies),
        }
        out["traffic"] = self.traffic()
        return out

    def traffic(self) -> dict[str, int]:
        """Bytes and packets through this pair's SAs now in the kernel (since their rekey)."""
        totals = {"out_bytes": 0, "out_packets": 0, "in_bytes": 0, "in_packets": 0}
        if self.xfrm is None:
            return totals
        local = str(self.cfg.local)
        try:
            sas = [sa for sa in self.xfrm.list_sas() if sa.reqid == self.cfg.reqid]
        except Exception:  # status output must not take the gateway down
            log.exception("listing SAs failed")
            return totals
        for sa in sas:
            way = "in" if sa.dst == local else "out"
            totals[f"{way}_bytes"] += sa.bytes
            totals[f"{way}_packets"] += sa.packets
        return totals

    def overall_state(self) -> GatewayState:
        if self.state is not GatewayState.RUNNING:
            return self.state
        if self.keys is not None and self.keys.active_epoch is not None:
            return GatewayState.RUNNING
        if self.session is not None and \
                self.session.status().state is SessionState.FAILED_CLOSED:
            return GatewayState.FAILED_CLOSED
        return GatewayState.DEGRADED


class _IpsecCollector(Collector):
    def __init__(self, gw: IpsecGateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        traffic = self.gw.traffic()
        # Gauges, not counters: the kernel counts per SA, and every rekey replaces the SAs.
        for unit in ("bytes", "packets"):
            g = GaugeMetricFamily(f"qgw_ipsec_sa_{unit}",
                                  f"ESP {unit} through the pair's SAs now in the kernel",
                                  labels=["direction"])
            for way in ("out", "in"):
                g.add_metric([way], traffic[f"{way}_{unit}"])
            yield g
        expires = CounterMetricFamily("qgw_ipsec_sa_expires", "Kernel SA lifetime expiries",
                                      labels=["kind"])
        for kind in ("soft", "hard"):
            expires.add_metric([kind], self.gw.expires[kind])
        yield expires
        keys = self.gw.keys
        protected = GaugeMetricFamily("qgw_ipsec_protected",
                                      "1 while an outbound SA protects the tunnel")
        protected.add_metric([], 0.0 if keys is None or keys.active_epoch is None else 1.0)
        yield protected
