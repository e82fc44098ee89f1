"""A headless participant of the video call: aiortc, SFrame-keyed by `MediaKeys`.

It joins a room of the signalling server (`apps.videocall.server`), sends the
test-pattern camera (`pattern.PatternTrack`) and a tone, and checks every
picture it decodes from the other side: pattern numbers must come in order,
and a picture without a valid pattern (garbage) must never appear.

    participant = Participant("http://videocall:8080", "quantum", "camera", keys,
                              width=1280, height=720, fps=30)
    stats = await participant.run(seconds=30)      # or run() ... await stop()
    json.dumps(stats.to_dict())                    # participant.stats(): the same, live

Signalling follows the server's protocol: the later joiner offers; SDP goes out
only once ICE gathering is complete (no trickled candidates). When the other
participant leaves, this one stays in the room and waits for the next offer;
when the signalling server is unreachable or drops the connection, it tries
again every `retry_s`. So a gateway can run it for as long as it runs.

SFrame is on for the whole run (`media.frame_crypto`), which makes this one
participant per process. Two opt-in hooks serve the benchmark (`bench.webrtc`):
`crypto=False` runs plain aiortc, its baseline (never for a gateway: media would
go out without SFrame), and `frame_times=True` records when each pattern frame
was made and shown (`FrameTimes`, the latest call's) for glass-to-glass latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from gateways.webrtc.keys import MediaKeys
from gateways.webrtc.media import FrameCrypto, frame_crypto
from gateways.webrtc.pattern import PatternChecker, PatternTrack, ToneTrack, read_pattern

log = logging.getLogger("qgw.gateway.webrtc")

T = TypeVar("T")
SIGNAL_TIMEOUT_S = 30.0      # for the server's answer to join
GATHER_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@dataclass
class FrameTimes:
    """time.monotonic() of one call's pattern frames (CLOCK_MONOTONIC: one clock for
    every process and network namespace of the machine, so two participants' times
    compare directly)."""

    created: list[float] = field(default_factory=list)            # index: frame count
    shown: list[tuple[int, float]] = field(default_factory=list)  # (pattern number, when)


class CallEnded(Exception):
    """The current call is over (the peer left, said bye, or the connection failed)."""


class Stopped(Exception):
    """`Participant.stop()` was called."""


class SignallingError(Exception):
    """The signalling server refused us (full room, bad name) or is not there."""


@dataclass
class ParticipantStats:
    """The participant's counters, all plain JSON values (`to_dict`)."""

    room: str
    name: str
    offerer: bool | None = None        # in the first call
    calls: int = 0                     # calls set up (SDP exchanged)
    connected: int = 0                 # calls whose connection came up
    video_sent: int = 0                # pattern frames handed to the encoder
    audio_sent: int = 0
    video_received: int = 0            # encoded frames that reached the SFrame layer
    video_dropped: int = 0             # of those, not opened (wrong key, tampered, ...)
    video_decoded: int = 0             # pictures decoded
    pattern_ok: int = 0                # ... carrying a valid pattern
    garbage: int = 0                   # ... carrying none: must stay 0
    duplicates: int = 0
    out_of_order: int = 0
    lost: int = 0                      # pattern numbers skipped
    audio_received: int = 0            # decoded audio frames
    keyframe_requests: int = 0
    seal_us_per_video_frame: float = 0.0
    open_us_per_video_frame: float = 0.0
    first_number: int | None = None
    last_number: int | None = None
    gaps: list[dict[str, Any]] = field(default_factory=list)   # number, lost, at (wall clock)
    crypto: dict[str, Any] = field(default_factory=dict)       # FrameCrypto.snapshot()
    ended: str | None = None           # why the last call (or the run) ended

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def signalling_ws_url(url: str) -> str:
    """The WebSocket URL of a signalling server given as http(s):// or ws(s)://."""
    parts = urlsplit(url)
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    if parts.scheme not in schemes or not parts.netloc:
        raise ValueError(f"not a signalling server URL: {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((schemes[parts.scheme], parts.netloc, path, parts.query, ""))


class Participant:
    """One side of the call: `await run()` until `await stop()` (or `seconds`)."""

    def __init__(self, signal_url: str, room: str, name: str, keys: MediaKeys, *,
                 width: int = 640, height: int = 360, fps: float = 30.0,
                 audio: bool = True, ice_servers: Sequence[RTCIceServer] = (),
                 ssl_context: ssl.SSLContext | None = None,
                 retry_s: float | None = 2.0, crypto: bool = True,
                 frame_times: bool = False) -> None:
        self.ws_url = signalling_ws_url(signal_url)
        self.room, self.name = room, name
        self.keys = keys
        self.width, self.height, self.fps = width, height, fps
        self.audio = audio
        # No STUN by default: aiortc would otherwise ask Google's, which a gateway
        # on a closed network cannot reach and would wait for.
        self.ice_servers = list(ice_servers)
        self.ssl_context = ssl_context
        self.retry_s = retry_s          # None: a signalling failure ends the run
        self.crypto = crypto            # False: plain aiortc, the benchmark's baseline only
        self._record_times = frame_times
        self.frame_times: FrameTimes | None = None     # the latest call's, if recorded
        self._checker = PatternChecker()
        self._calls = self._connected = self._audio_received = 0
        self._offerer: bool | None = None
        self._ended: str | None = None
        self._crypto: FrameCrypto | None = None
        self._camera: PatternTrack | None = None      # this call's tracks
        self._tone: ToneTrack | None = None
        self._sent_earlier = (0, 0)                     # (video, audio) of earlier calls
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False

    # -- control and counters ------------------------------------------------------------

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """End the run (bye, close the call and the socket) and wait for it to end."""
        self._stop.set()
        if self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), timeout_s)

    def snapshot(self) -> ParticipantStats:
        pattern = self._checker.stats
        stats = ParticipantStats(
            self.room, self.name, offerer=self._offerer, calls=self._calls,
            connected=self._connected, audio_received=self._audio_received,
            video_decoded=pattern.decoded, pattern_ok=pattern.ok, garbage=pattern.garbage,
            duplicates=pattern.duplicates, out_of_order=pattern.out_of_order,
            lost=pattern.lost, first_number=pattern.first, last_number=pattern.last,
            gaps=[asdict(gap) for gap in list(pattern.gaps)], ended=self._ended)
        video_sent, audio_sent = self._sent_earlier
        camera, tone = self._camera, self._tone
        stats.video_sent = video_sent + (camera.frames_sent if camera else 0)
        stats.audio_sent = audio_sent + (tone.frames_sent if tone else 0)
        if self._crypto is not None:
            stats.crypto = self._crypto.snapshot()
            video = self._crypto.stats.video
            stats.video_received = video.opened + video.dropped + video.malformed
            stats.video_dropped = video.dropped + video.malformed
            stats.keyframe_requests = video.keyframe_requests
            if video.sealed:
                stats.seal_us_per_video_frame = round(video.seal_ns / video.sealed / 1e3, 1)
            if video.opened:
                stats.open_us_per_video_frame = round(video.open_ns / video.opened / 1e3, 1)
        return stats

    def stats(self) -> dict[str, Any]:
        """`snapshot()` as JSON values (a gateway polls this for its metrics)."""
        return self.snapshot().to_dict()

    async def run(self, *, seconds: float | None = None) -> ParticipantStats:
        if self._running:
            raise RuntimeError("this participant is running already")
        self._running = True
        self._finished.clear()
        timer = (asyncio.get_running_loop().call_later(seconds, self._stop.set)
                 if seconds is not None else None)
        layer: contextlib.AbstractContextManager[FrameCrypto | None] = (
            frame_crypto(self.keys) if self.crypto else contextlib.nullcontext())
        try:
            with layer as crypto:
                self._crypto = crypto
                await self._run_sessions()
        finally:
            if timer is not None:
                timer.cancel()
            self._running = False
            self._finished.set()
        return self.snapshot()

    # -- signalling ---------------------------------------------------------------------

    async def _run_sessions(self) -> None:
        while True:
            try:
                await self._session()
            except Stopped:
                self._ended = self._ended or "stopped"
                return
            except SignallingError as exc:
                self._ended = str(exc)
                if self.retry_s is None:
                    raise
                log.warning("%s; trying again in %.0f s", exc, self.retry_s)
                try:
                    await self._until_stopped(asyncio.sleep(self.retry_s))
                except Stopped:
                    return

    async def _session(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            try:
                ws = await self._until_stopped(
                    http.ws_connect(self.ws_url, heartbeat=20, ssl=self.ssl_context or True))
            except aiohttp.ClientError as exc:
                raise SignallingError(f"cannot reach the signalling server: {exc}") from exc
            async with ws:
                await ws.send_json({"type": "join", "room": self.room, "name": self.name})
                try:
                    joined = await self._until_stopped(
                        asyncio.wait_for(ws.receive_json(), SIGNAL_TIMEOUT_S))
                except (TimeoutError, TypeError, ValueError) as exc:
                    raise SignallingError("the signalling server did not answer join") \
                        from exc
                if joined.get("type") != "joined":
                    raise SignallingError(f"join refused: {joined.get('message', joined)}")
                offerer = bool(joined.get("offerer"))
                if self._offerer is None:
                    self._offerer = offerer
                log.info("%s joined room %s as the %s", self.name, self.room,
                         "offerer" if offerer else "answerer")
                try:
                    while True:
                        try:
                            await self._call(ws, offerer)
                        except CallEnded as ended:
                            self._ended = str(ended)
                            log.info("call ended: %s; waiting for the next offer", ended)
                        offerer = False   # a newcomer is the later joiner: it offers
                finally:
                    if not ws.closed:
                        with contextlib.suppress(ConnectionError):
                            await ws.send_json({"type": "bye"})

    async def _next_signal(self, ws: aiohttp.ClientWebSocketResponse, wanted: str | None,
                           ) -> dict[str, Any]:
        """The next message of type `wanted`; CallEnded on bye/left (None: wait for that)."""
        while True:
            msg = await self._until_stopped(ws.receive())
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise SignallingError("the signalling server closed the connection")
            try:
                message = msg.json()
            except ValueError:
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            if kind is not None and kind == wanted:
                return message
            if kind in ("bye", "left"):
                raise CallEnded(f"{message.get('from') or message.get('name')} left")
            if kind == "error":
                log.warning("signalling server: %s", message.get("message"))
            # offers/answers out of turn and candidates (we do not trickle) are ignored

    async def _until_stopped(self, step: Awaitable[T]) -> T:
        """`step`'s result, or Stopped as soon as stop() is called."""
        task = asyncio.ensure_future(step)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise Stopped
        return task.result()

    # -- one call -------------------------------------------------------------------------

    async def _call(self, ws: aiohttp.ClientWebSocketResponse, offerer: bool) -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers))
        watchers: list[asyncio.Task[None]] = []
        failed = asyncio.Event()
        times = FrameTimes() if self._record_times else None
        self.frame_times = times
        self._camera = PatternTrack(self.width, self.height, self.fps,
                                    created=times.created if times is not None else None)
        _prefer(pc.addTransceiver(self._camera, direction="sendrecv"), "video/VP8")
        if self.audio:
            self._tone = ToneTrack()
            _prefer(pc.addTransceiver(self._tone, direction="sendrecv"), "audio/opus")

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            watch = self._watch_video if track.kind == "video" else self._watch_audio
            watchers.append(asyncio.ensure_future(watch(track)))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("%s: connection %s", self.name, pc.connectionState)
            if pc.connectionState == "connected":
                self._connected += 1
            elif pc.connectionState in ("failed", "closed"):
                failed.set()

        try:
            if offerer:
                await pc.setLocalDescription(await pc.createOffer())
                await _gathered(pc)
                await ws.send_json({"type": "offer", "sdp": pc.localDescription.sdp})
                answer = await self._next_signal(ws, "answer")
                await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
            else:
                offer = await self._next_signal(ws, "offer")
                await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
                await pc.setLocalDescription(await pc.createAnswer())
                await _gathered(pc)
                await ws.send_json({"type": "answer", "sdp": pc.localDescription.sdp})
            self._calls += 1
            await self._in_call(ws, failed)
        finally:
            await pc.close()
            sent = self.snapshot()   # this call's frames, before its tracks go
            self._sent_earlier = (sent.video_sent, sent.audio_sent)
            self._camera = self._tone = None
            for watch in watchers:
                watch.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    async def _in_call(self, ws: aiohttp.ClientWebSocketResponse, failed: asyncio.Event) -> None:
        signal = asyncio.ensure_future(self._next_signal(ws, None))
        broken = asyncio.ensure_future(failed.wait())
        try:
            await asyncio.wait({signal, broken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            broken.cancel()
            if not signal.done():
                signal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await signal
        if signal.done():
            signal.result()     # raises CallEnded, Stopped or SignallingError
        raise CallEnded("the connection failed")

    async def _watch_video(self, track: MediaStreamTrack) -> None:
        self._checker.restart()     # a new stream: its numbers start over
        times = self.frame_times
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            shown = time.monotonic() if times is not None else 0.0
            number = read_pattern(frame)  # type: ignore[arg-type]
            if times is not None and number is not None:
                times.shown.append((number, shown))
            self._checker.feed(number)

    async def _watch_audio(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            self._audio_received += 1


def _prefer(transceiver: RTCRtpTransceiver, mime: str) -> None:
    """Offer/accept only `mime` (and RTX): the codecs SFrame is mapped for."""
    codecs = [c for c in RTCRtpSender.getCapabilities(transceiver.kind).codecs
              if c.mimeType.lower() in (mime.lower(), f"{transceiver.kind}/rtx")]
    transceiver.setCodecPreferences(codecs)


async def _gathered(pc: RTCPeerConnection) -> None:
    """Wait for ICE gathering (aiortc completes it in setLocalDescription already)."""
    deadline = time.monotonic() + GATHER_TIMEOUT_S
    while pc.iceGatheringState != "complete":
        if time.monotonic() > deadline:
            raise CallEnded("ICE gathering did not complete")
        await asyncio.sleep(0.05)


async def run_participant(signal_url: str, room: str, name: str, keys: MediaKeys, *,
                          seconds: float | None = None, stop: asyncio.Event | None = None,
                          width: int = 640, height: int = 360, fps: float = 30.0,
                          audio: bool = True, ice_servers: Sequence[RTCIceServer] = (),
                          retry_s: float | None = None) -> ParticipantStats:
    """Run one participant for `seconds`, or until `stop` is set; return its counters.

    Unlike a long-running `Participant`, a signalling failure ends it (SignallingError)
    unless `retry_s` is given.
    """
    participant = Participant(signal_url, room, name, keys, width=width, height=height,
                              fps=fps, audio=audio, ice_servers=ice_servers, retry_s=retry_s)
    watcher: asyncio.Task[None] | None = None
    if stop is not None:
        async def relay_stop() -> None:
            await stop.wait()
            await participant.stop()
        watcher = asyncio.ensure_future(relay_stop())
    try:
        return await participant.run(seconds=seconds)
    finally:
        if watcher is not None:
            watcher.cancel()
