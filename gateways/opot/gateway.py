"""The OPoT gateway: one node of a service chain proving that packets crossed it, in order.

One process per node. It keys its links' masks through KeySessions (the
upstream node of a link is the master), takes its PoT profile shares from the
controller, and runs the data plane (`gateways.opot.dataplane`). The egress
is the controller (`ProfileController`): it draws a QKD key from its KME for
each new profile, derives the profile (`Controller.rotate`), pushes every node
its share over mutual TLS, installs its own verifier, tells the ingress to
switch, and retires the previous index after the overlap (two indices, as the
draft's profile rotation).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateways.base import GatewayState, ThreadedGateway
from gateways.config import hostport, serve_metrics
from gateways.opot.config import ControllerCfg, OpotConfig
from gateways.opot.dataplane import ChainNode
from gateways.opot.masks import LinkKeys
from gateways.opot.pot import Controller, Egress, Ingress, NodeProfile, Profile, Transit
from keyclient import Etsi014Client
from keyclient.control import ChannelDown, Message, TlsControlChannel
from keyclient.errors import KeySupplyError
from keyclient.metrics import register_session
from keyclient.session import KeySession, Role
from qgw.pki import Pki
from qgw.tls import TlsFiles

log = logging.getLogger("qgw.gateway.opot")

ACK_TIMEOUT_S = 5.0
RETRY_S = 1.0
PROFILE_FIELDS = ("index", "node", "prime", "x", "share", "pre_eval", "lpc")


class ProfileReceiver:
    """A node's side of profile distribution: install, activate (ingress), retire."""

    def __init__(self, files: TlsFiles, controller_sae: str, listen: tuple[str, int],
                 role: Ingress | Transit) -> None:
        self.role = role
        self.channel = TlsControlChannel(files, controller_sae, listen=listen)
        self.channel.bind(self._on_message, lambda up: None)

    def start(self) -> None:
        self.channel.start()

    def close(self) -> None:
        self.channel.close()

    def _on_message(self, msg: Message) -> None:
        kind = msg.get("type")
        try:
            if kind == "profile":
                fields = {k: msg[k] for k in PROFILE_FIELDS}
                self.role.install(NodeProfile(**fields))
                reply: Message = {"type": "installed", "index": msg["index"]}
            elif kind == "activate" and isinstance(self.role, Ingress):
                self.role.activate(int(msg["index"]))
                reply = {"type": "activated", "index": msg["index"]}
            elif kind == "retire":
                self.role.retire(int(msg["index"]), after=float(msg.get("after", 0.0)))
                return
            else:
                return
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("profile message %s refused: %s", kind, exc)
            reply = {"type": "refused", "index": msg.get("index"), "reason": str(exc)}
        with contextlib.suppress(ChannelDown):
            self.channel.send(reply)


class ProfileController:
    """The egress's controller: derives, pushes and rotates the chain's profiles."""

    def __init__(self, cfg: ControllerCfg, path: str, nodes: list[str], files: TlsFiles,
                 kme: Etsi014Client, randomness_peer: str, egress: Egress,
                 clock: Any = time.monotonic) -> None:
        self.cfg = cfg
        self.kme = kme
        self.randomness_peer = randomness_peer
        self.egress = egress
        self.clock = clock
        self.controller = Controller(path, nodes)
        self.ingress = nodes[0]
        self.current: Profile | None = None
        self.rotations = 0
        self.failures = 0
        self._acks: dict[tuple[str, int], str] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.channels: dict[str, TlsControlChannel] = {}
        for n in cfg.nodes:
            ch = TlsControlChannel(files, n.sae, connect=hostport(n.address))
            ch.bind(functools.partial(self._on_message, n.node),
                    functools.partial(self._on_link, n.node))
            self.channels[n.node] = ch

    def start(self) -> None:
        for ch in self.channels.values():
            ch.start()
        self._thread = threading.Thread(target=self._run, name="opot-controller", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for ch in self.channels.values():
            ch.close()

    def _on_message(self, node: str, msg: Message) -> None:
        kind, index = msg.get("type"), msg.get("index")
        if kind in ("installed", "activated", "refused") and isinstance(index, int):
            with self._cond:
                self._acks[(node, index)] = str(kind)
                self._cond.notify_all()

    def _on_link(self, node: str, up: bool) -> None:
        if up and self.current is not None:
            # A node that restarted lost its shares: give it the current profile again.
            threading.Thread(target=self._resend, args=(node,), daemon=True).start()

    def _resend(self, node: str) -> None:
        profile = self.current
        if profile is None:
            return
        try:
            self._push(node, profile)
            if node == self.ingress:
                self._send(node, {"type": "activate", "index": profile.index})
        except (ChannelDown, TimeoutError) as exc:
            log.warning("re-sending the profile to %s failed: %s", node, exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not all(ch.up for ch in self.channels.values()):
                self._stop.wait(0.2)
                continue
            try:
                self.rotate()
                wait = self.cfg.rotate_s
            except (ChannelDown, TimeoutError, KeySupplyError) as exc:
                self.failures += 1
                log.warning("profile rotation failed, retrying: %s", exc)
                wait = RETRY_S
            self._stop.wait(wait)

    def rotate(self) -> Profile:
        """One rotation: new profile on every node, switch at the ingress, retire the old."""
        (key,) = self.kme.get_keys(self.randomness_peer, 1, 256)
        profile = self.controller.rotate(key.secret)
        key.secret.wipe()
        try:
            for node in self.channels:
                self._push(node, profile)
            self.egress.install(profile.verifier())
            self._send(self.ingress, {"type": "activate", "index": profile.index})
            self._wait(self.ingress, profile.index, "activated")
        except (ChannelDown, TimeoutError):
            self._abandon(profile)
            raise
        previous, self.current = self.current, profile
        self.rotations += 1
        if previous is not None:
            msg = {"type": "retire", "index": previous.index, "after": self.cfg.overlap_s}
            for node in self.channels:
                self._send(node, msg)
            self.egress.retire(previous.index, after=self.cfg.overlap_s)
        log.info("profile %d active on path %s (rotation %d)", profile.index,
                 self.controller.path, self.rotations)
        return profile

    def _abandon(self, profile: Profile) -> None:
        """Take back a profile that did not reach every node, so that the retry can use its
        index again: nodes refuse a profile over an index they still hold. Should the
        ingress have activated it after all (its answer lost), it stops stamping until
        the retry lands; that beats a chain that never rotates again."""
        self.controller.abandon(profile)
        msg: Message = {"type": "retire", "index": profile.index}
        for node in self.channels:
            with contextlib.suppress(ChannelDown):
                self._send(node, msg)
        self.egress.retire(profile.index)

    def _push(self, node: str, profile: Profile) -> None:
        share = asdict(profile.node(node))
        self._send(node, {"type": "profile", **{k: share[k] for k in PROFILE_FIELDS}})
        self._wait(node, profile.index, "installed")

    def _send(self, node: str, msg: Message) -> None:
        with self._cond:
            self._acks.pop((node, msg.get("index", -1)), None)
        self.channels[node].send(msg)

    def _wait(self, node: str, index: int, want: str) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT_S
        with self._cond:
            while (got := self._acks.get((node, index))) is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    raise TimeoutError(f"{node} did not confirm profile {index}")
                self._cond.wait(left)
        if got != want:
            raise TimeoutError(f"{node} refused profile {index}")


class OpotGateway(ThreadedGateway):
    name = "opot"
    summary = "Ordered proof of transit for service function chains, keyed by QKD"

    def __init__(self, cfg: OpotConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.sessions: list[KeySession] = []
        self.links: dict[str, LinkKeys] = {}
        self.role: Ingress | Transit | Egress | None = None
        self.node: ChainNode | None = None
        self.receiver: ProfileReceiver | None = None
        self.controller: ProfileController | None = None
        self._kme: Etsi014Client | None = None
        self._stop_metrics: Callable[[], None] = lambda: None


    def open(self) -> None:
        cfg = self.cfg
        self.state = GatewayState.STARTING
        files = Pki(cfg.pki).sae_files(cfg.sae)
        nodes = cfg.path.nodes
        where = nodes.index(cfg.node)
        ordered = cfg.path.ordered
        try:
            self._kme = Etsi014Client(cfg.kme, files)
            up = down = None
            if cfg.upstream is not None:
                up = self.links["upstream"] = LinkKeys(cfg.path.id, nodes[where - 1], cfg.node)
                self._session(Role.SLAVE, cfg.upstream.sae, up, TlsControlChannel(
                    files, cfg.upstream.sae,
                    listen=(cfg.upstream.listen.host, cfg.upstream.listen.port)))
            if cfg.downstream is not None:
                down = self.links["downstream"] = LinkKeys(cfg.path.id, cfg.node,
                                                           nodes[where + 1])
                self._session(Role.MASTER, cfg.downstream.sae, down, TlsControlChannel(
                    files, cfg.downstream.sae, connect=hostport(cfg.downstream.connect)))
            if cfg.role == "ingress":
                # Sequence numbers must never repeat on a path, also across restarts:
                # start from the time in microseconds.
                self.role = Ingress(cfg.node, ordered=ordered, downstream=down,
                                    first_seq=time.time_ns() // 1000)
            elif cfg.role == "transit":
                self.role = Transit(cfg.node, ordered=ordered, upstream=up, downstream=down)
            else:
                self.role = Egress(cfg.node, ordered=ordered, upstream=up)
            if isinstance(self.role, Egress):
                assert cfg.controller is not None and cfg.upstream is not None
                self.controller = ProfileController(cfg.controller, cfg.path.id, nodes, files,
                                                    self._kme, cfg.upstream.sae, self.role)
            else:
                assert cfg.controller_sae is not None and cfg.profiles_listen is not None
                self.receiver = ProfileReceiver(
                    files, cfg.controller_sae,
                    (cfg.profiles_listen.host, cfg.profiles_listen.port), self.role)
            self.node = ChainNode(cfg.role, cfg.interfaces.left, cfg.interfaces.right,
                                  self.role, spi=cfg.path.spi)
            self.registry.register(_OpotCollector(self))
            self.node.start()
            if self.receiver is not None:
                self.receiver.start()
            for session in self.sessions:
                session.start()
            if self.controller is not None:
                self.controller.start()
            self._stop_metrics = serve_metrics(cfg.metrics, self.registry)
        except BaseException:
            self.close()
            raise
        self.state = GatewayState.RUNNING
        log.info("OPoT %s %s up on path %s (%s): %s -> %s", cfg.role, cfg.node, cfg.path.id,
                 "ordered" if ordered else "plain", cfg.interfaces.left, cfg.interfaces.right)

    def _session(self, role: Role, peer: str, keys: LinkKeys,
                 channel: TlsControlChannel) -> None:
        assert self._kme is not None
        session = KeySession(role, kme=self._kme, local_sae=self.cfg.sae, peer_sae=peer,
                             channel=channel, installer=keys, policy=self.cfg.keys)
        self.sessions.append(session)
        register_session(session, self.registry, gateway="opot")

    def close(self) -> None:
        self.state = GatewayState.STOPPING
        if self.controller is not None:
            self.controller.close()
        if self.receiver is not None:
            self.receiver.close()
        for session in self.sessions:
            session.stop()
        if self.node is not None:
            self.node.stop()
        self._stop_metrics()
        self._stop_metrics = lambda: None
        if self._kme is not None:
            self._kme.close()
            self._kme = None
        self.state = GatewayState.STOPPED

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": self.cfg.role, "node": self.cfg.node, "path": self.cfg.path.id,
            "ordered": self.cfg.path.ordered, "state": self.state.value,
            "profiles": self.role.profiles if self.role is not None else [],
            "links": {name: {"epoch": k.active_epoch, "fail_closed": k.closed_reason}
                      for name, k in self.links.items()},
            "counters": dict(self.node.counters) if self.node is not None else {},
        }
        if isinstance(self.role, Egress):
            out["verified"] = self.role.verified
            out["rejected"] = dict(self.role.rejected)
        if self.controller is not None:
            out["rotations"] = self.controller.rotations
        return out


class _OpotCollector(Collector):
    def __init__(self, gw: OpotGateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        node = self.gw.node
        packets = CounterMetricFamily("qgw_opot_packets", "Packets handled, by outcome",
                                      labels=["outcome"])
        for outcome, n in (node.counters.items() if node is not None else []):
            packets.add_metric([outcome], n)
        yield packets
        role = self.gw.role
        if isinstance(role, Egress):
            verified = CounterMetricFamily("qgw_opot_verified", "Proofs verified at the egress")
            verified.add_metric([], role.verified)
            yield verified
            rejected = CounterMetricFamily("qgw_opot_rejected", "Proofs rejected, by reason",
                                           labels=["reason"])
            for reason, n in role.rejected.items():
                rejected.add_metric([reason], n)
            yield rejected
        profiles = GaugeMetricFamily("qgw_opot_profiles", "Profile indices installed")
        profiles.add_metric([], len(role.profiles) if role is not None else 0)
        yield profiles
        if self.gw.controller is not None:
            rot = CounterMetricFamily("qgw_opot_rotations", "Profiles rotated by the controller")
            rot.add_metric([], self.gw.controller.rotations)
            yield rot
