"""The WebRTC gateway: one participant of a call, its media end-to-end encrypted with SFrame.

Start-up: the key session with the peer participant's gateway (mutual TLS
control channel; keys from an ETSI 004 stream by default, as in the trial, or
ETSI 014), whose installer is `MediaKeys`; then the media side in an asyncio
loop of its own thread:

    media: aiortc    a headless participant (`participant.py`): a test-pattern
                     camera and tone, the remote picture checked frame by frame
    media: browser   no media here: `KeyHandoff` hands the keys to the
                     participant's browser page, which seals and opens frames
                     with WebCrypto; its counters come back over the same socket

Rotation is the key session's rekey interval: each QKD key is a new epoch and
a new SFrame KID, installed on both sides before either sends under it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateways.base import GatewayState, ThreadedGateway
from gateways.config import serve_metrics
from gateways.webrtc.config import WebrtcConfig
from gateways.webrtc.keys import MediaKeys
from keyclient import Etsi004Client, Etsi014Client, SessionStreamSupply
from keyclient.control import TlsControlChannel
from keyclient.metrics import register_session
from keyclient.session import KeySession, Role, SessionState
from keyclient.supply import KeySupply
from qgw.pki import Pki

log = logging.getLogger("qgw.gateway.webrtc")

STOP_TIMEOUT_S = 10.0


class WebrtcGateway(ThreadedGateway):
    name: ClassVar[str] = "webrtc"
    summary: ClassVar[str] = "end-to-end encrypted video call (SFrame, RFC 9605) keyed by QKD"

    def __init__(self, cfg: WebrtcConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.keys = MediaKeys(cfg.role, cfg.cipher_suite)
        self.session: KeySession | None = None
        self.media: Any = None          # a Participant or a KeyHandoff, in the media loop
        self.page_link: str | None = None
        self._supply: KeySupply | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._media_done: Future[Any] | None = None
        self._stop_metrics: Callable[[], None] = lambda: None


    def open(self) -> None:
        cfg = self.cfg
        self.state = GatewayState.STARTING
        try:
            files = Pki(cfg.pki).sae_files(cfg.sae)
            self._supply = (SessionStreamSupply(Etsi004Client(cfg.kme, files),
                                                local_sae=cfg.sae, peer_sae=cfg.peer.sae)
                            if cfg.key_api == "004" else Etsi014Client(cfg.kme, files))
            listen = cfg.control_listen
            channel = TlsControlChannel(
                files, cfg.peer.sae, connect=cfg.control_connect,
                listen=(listen.host, listen.port) if listen is not None else None)
            self.session = KeySession(Role(cfg.role), kme=self._supply, local_sae=cfg.sae,
                                      peer_sae=cfg.peer.sae, channel=channel,
                                      installer=self.keys, policy=cfg.keys)
            register_session(self.session, self.registry, gateway="webrtc")
            self.registry.register(_WebrtcCollector(self))
            self.session.start()
            self._start_media()
            self._stop_metrics = serve_metrics(cfg.metrics, self.registry)
        except BaseException:
            self.close()
            raise
        self.state = GatewayState.RUNNING
        log.info("WebRTC gateway %s (%s, media %s) up: room %r as %r, keys from ETSI %s",
                 cfg.sae, cfg.role, cfg.media, cfg.call.room, cfg.call.name, cfg.key_api)

    def _start_media(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._loop_thread = threading.Thread(target=loop.run_forever, daemon=True,
                                             name="webrtc-media")
        self._loop_thread.start()
        started = asyncio.run_coroutine_threadsafe(self._media_start(), loop)
        started.result(timeout=30)

    async def _media_start(self) -> None:
        cfg = self.cfg
        if cfg.media == "browser":
            from gateways.webrtc.handoff import KeyHandoff

            handoff = KeyHandoff(self.keys, cfg.handoff.host, cfg.handoff.port,
                                 origins=cfg.page_origins)
            await handoff.start()
            self.media = handoff
            self.page_link = handoff.page_link(str(cfg.call.signal), cfg.call.room,
                                               cfg.call.name)
            return
        from gateways.webrtc.participant import Participant

        participant = Participant(str(cfg.call.signal), cfg.call.room, cfg.call.name,
                                  self.keys, width=cfg.video.width,
                                  height=cfg.video.height, fps=cfg.video.fps)
        self.media = participant
        self._media_done = asyncio.run_coroutine_threadsafe(participant.run(),
                                                            asyncio.get_running_loop())

    def close(self) -> None:
        """Leave the call, stop the key session and forget every key."""
        self.state = GatewayState.STOPPING
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._media_stop(), loop).result(
                    timeout=STOP_TIMEOUT_S)
            except Exception:  # stopping must go on: keys are dropped below regardless
                log.exception("stopping the media side failed")
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=STOP_TIMEOUT_S)
        if self.session is not None:
            self.session.stop()
        self.keys.invalidate("gateway stopped")
        self._stop_metrics()
        self._stop_metrics = lambda: None
        supply, self._supply = self._supply, None
        if supply is not None and hasattr(supply, "close"):
            supply.close()
        self._loop = self._loop_thread = None
        self.state = GatewayState.STOPPED

    async def _media_stop(self) -> None:
        media = self.media
        if media is not None:
            await media.stop()
        done = self._media_done
        if done is not None and not done.done():
            done.cancel()

    # -- status ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        keys, session = self.keys, self.session
        st = session.status() if session is not None else None
        out: dict[str, Any] = {
            "role": self.cfg.role, "sae": self.cfg.sae, "media": self.cfg.media,
            "state": self.overall_state().value,
            "session": st.state.value if st is not None else None,
            "epoch": keys.active_epoch, "kid": keys.send_kid, "key_id": keys.key_id,
            "key_source": keys.source, "rotations": keys.rotations,
            "fail_closed": keys.closed_reason,
            "frames_sealed": keys.sealed, "frames_opened": keys.opened,
            "drops": {k: n for k, n in keys.drop_counts().items() if n},
        }
        media = self.media
        if self.cfg.media == "browser":
            out["pages"] = media.connected if media is not None else 0
            out["page"] = media.latest_stats() if media is not None else None
        elif media is not None:
            out["call"] = media.stats()
        return out

    def overall_state(self) -> GatewayState:
        if self.state is not GatewayState.RUNNING:
            return self.state
        if self.keys.active_epoch is not None:
            return GatewayState.RUNNING
        if self.session is not None and \
                self.session.status().state is SessionState.FAILED_CLOSED:
            return GatewayState.FAILED_CLOSED
        return GatewayState.DEGRADED


class _WebrtcCollector(Collector):
    def __init__(self, gw: WebrtcGateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        keys = self.gw.keys
        frames = CounterMetricFamily("qgw_webrtc_frames", "Media frames through SFrame",
                                     labels=["direction"])
        frames.add_metric(["sealed"], keys.sealed)
        frames.add_metric(["opened"], keys.opened)
        yield frames
        drops = CounterMetricFamily("qgw_webrtc_frames_dropped",
                                    "Frames not sent or not shown, by reason",
                                    labels=["reason"])
        for reason, count in keys.drop_counts().items():
            drops.add_metric([reason], count)
        yield drops
        yield CounterMetricFamily("qgw_webrtc_rotations", "SFrame key rotations (new KIDs)",
                                  value=keys.rotations)
        protected = GaugeMetricFamily("qgw_webrtc_protected",
                                      "1 while a key protects what this participant sends")
        protected.add_metric([], 0.0 if keys.active_epoch is None else 1.0)
        yield protected
        media = self.gw.media
        if media is None:
            return
        if self.gw.cfg.media == "browser":
            page = media.latest_stats() or {}
            g = GaugeMetricFamily("qgw_webrtc_page", "The browser page's latest counters",
                                  labels=["counter"])
            for name, value in sorted(page.items()):
                if isinstance(value, int | float) and not isinstance(value, bool):
                    g.add_metric([name], float(value))
            yield g
            yield GaugeMetricFamily("qgw_webrtc_pages", "Browser pages connected for keys",
                                    value=media.connected)
        else:
            call = media.stats()
            g = GaugeMetricFamily("qgw_webrtc_call", "The aiortc participant's call counters",
                                  labels=["counter"])
            for name, value in sorted(call.items()):
                if isinstance(value, int | float) and not isinstance(value, bool):
                    g.add_metric([name], float(value))
            yield g
