"""SFrame on aiortc's media path, without forking aiortc.

aiortc has no encoded-frame hook, so this swaps the codecs it picks:
`aiortc.rtcrtpsender.get_encoder` and `aiortc.rtcrtpreceiver.get_decoder` are
looked up by name on every new sender/receiver, and `frame_crypto(keys)`
replaces both names for as long as it is entered.

Sending, VP8: the encoder subclass seals each *encoded frame* before aiortc's own
packetiser splits it into RTP payloads (the VP8 payload descriptor stays in
front of every packet, as RFC 7741 wants). The first bytes of the frame stay in
the clear, as browser E2EE (Chromium insertable streams / Jitsi, and the
WebRTC encoded-transform page of this project) keeps them: 10 of a key frame
(frame tag, start code, dimensions), 3 of a delta frame (frame tag); see
`sframe.vp8_clear_bytes`. They are bound to the frame as SFrame metadata.

Sending, Opus: every encoded packet is sealed whole (`OPUS_CLEAR_BYTES`).

Receiving: aiortc depayloads the packets and reassembles the frame in its
jitter buffer; the decoder subclass opens it before the codec sees it. A frame
that does not open is dropped (counted by `MediaKeys.drops`), never decoded.
Since later VP8 delta frames refer to the dropped one, video then waits for the
next key frame and asks the sender for one: raising an `av.FFmpegError` from
`decode` is the only way to reach aiortc's "send a PLI" path from a codec.

A frame `MediaKeys.seal` refuses (no key: fail closed) is not sent; the next
video frame is forced to be a key frame so the receiver can resume on it.

The patch is process-global: one participant per process, which is the
gateway's model (a gateway process is one side of one call).

aiortc internals relied on (written against aiortc 1.16): the two module names
above; `Vp8Encoder.encode`/`pack` calling `self._packetize(frame, picture_id)` once
per encoded frame (so since aiortc 0.9); `decoder_worker` catching an
`av.FFmpegError` from `Decoder.decode` and sending a PLI for video. Older
decoder workers do not catch it (the exception would end the decoder thread),
so there the decoder only waits for the sender's next key frame
(`KEYFRAME_REQUESTS`).
"""

from __future__ import annotations

import errno
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
import av
from aiortc.codecs.base import Decoder, Encoder
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.codecs.vpx import Vp8Decoder, Vp8Encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av.frame import Frame
from av.packet import Packet

from gateways.webrtc.keys import MediaKeys
from gateways.webrtc.sframe import VP8_KEY_FRAME_CLEAR, MalformedFrame, vp8_clear_bytes

log = logging.getLogger("qgw.gateway.webrtc")

# Jitsi's E2EE and the WebRTC samples keep the Opus TOC byte clear (their
# "undefined frame type" offset of 1). Nothing between the two ends reads it:
# aiortc and browsers packetise Opus without parsing it, an SFU forwards audio
# by the RTP header and the audio-level extension. So the whole packet is
# sealed, which also hides the mode/bandwidth the TOC byte would give away.
# The browser page must use the same value.
OPUS_CLEAR_BYTES = 0

# How often a video receiver that waits for a key frame asks for one again
# (each ask is one aiortc warning log line and one RTCP PLI).
KEYFRAME_REQUEST_INTERVAL_S = 0.5

SUPPORTED = ("video/vp8", "audio/opus")

# Whether this aiortc turns a decoder's FFmpegError into a PLI (see the docstring).
KEYFRAME_REQUESTS = "decode_error" in inspect.signature(
    aiortc.rtcrtpreceiver.decoder_worker).parameters


@dataclass
class KindStats:
    """Frames of one media kind through the SFrame layer.

    Each field is written by one codec thread only (encoder or decoder of the
    kind), so plain increments are enough.
    """

    sealed: int = 0
    not_sent: int = 0            # no key to send under (or the KID is exhausted)
    opened: int = 0
    dropped: int = 0             # did not open: MediaKeys.drops says why
    malformed: int = 0           # too short to carry its clear VP8 header
    awaiting_keyframe: int = 0   # opened, but a delta frame after a loss: not decodable
    keyframe_requests: int = 0
    seal_ns: int = 0             # time spent sealing / opening, for per-frame cost
    open_ns: int = 0
    sealed_bytes: int = 0        # of the frames sealed, before SFrame's overhead


@dataclass
class FrameCryptoStats:
    video: KindStats = field(default_factory=KindStats)
    audio: KindStats = field(default_factory=KindStats)
    unsupported_codecs: list[str] = field(default_factory=list)


class FrameCrypto:
    """The SFrame layer of one participant: its codecs and their counters."""

    def __init__(self, keys: MediaKeys) -> None:
        self.keys = keys
        self.stats = FrameCryptoStats()

    # -- codec factories (what aiortc's get_encoder / get_decoder become) ------

    def get_encoder(self, codec: RTCRtpCodecParameters) -> Encoder:
        mime = codec.mimeType.lower()
        if mime == "video/vp8":
            return SealingVp8Encoder(self)
        if mime == "audio/opus":
            return SealingOpusEncoder(self)
        return RefusingEncoder(self._unsupported(mime))

    def get_decoder(self, codec: RTCRtpCodecParameters) -> Decoder:
        mime = codec.mimeType.lower()
        if mime == "video/vp8":
            return OpeningVp8Decoder(self)
        if mime == "audio/opus":
            return OpeningOpusDecoder(self)
        return RefusingDecoder(self._unsupported(mime))

    def _unsupported(self, mime: str) -> str:
        # Fail closed: a codec we cannot frame-encrypt sends and shows nothing.
        log.error("codec %s has no SFrame mapping: its media is neither sent nor shown "
                  "(offer only %s)", mime, ", ".join(SUPPORTED))
        if mime not in self.stats.unsupported_codecs:
            self.stats.unsupported_codecs.append(mime)
        return mime

    # -- sealing and opening ----------------------------------------------------------

    def seal(self, kind: KindStats, frame: bytes, clear: int) -> bytes | None:
        start = time.perf_counter_ns()
        sealed = self.keys.seal(frame, clear)
        kind.seal_ns += time.perf_counter_ns() - start
        if sealed is None:
            kind.not_sent += 1
        else:
            kind.sealed += 1
            kind.sealed_bytes += len(frame)
        return sealed

    def open(self, kind: KindStats, data: bytes, clear: int) -> bytes | None:
        start = time.perf_counter_ns()
        frame = self.keys.open(data, clear)
        kind.open_ns += time.perf_counter_ns() - start
        if frame is None:
            kind.dropped += 1
        else:
            kind.opened += 1
        return frame

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain JSON values (no key material, no key IDs)."""
        keys = self.keys
        drops = dict(keys.drops)   # one C-level copy: codec threads may add a reason
        return {
            "video": asdict(self.stats.video),
            "audio": asdict(self.stats.audio),
            "unsupported_codecs": list(self.stats.unsupported_codecs),
            "keys": {
                "sealed": keys.sealed,
                "opened": keys.opened,
                "drops": {str(reason): n for reason, n in sorted(drops.items())},
                "rotations": keys.rotations,
                "send_kid": keys.send_kid,
                "source": keys.source,
            },
        }


class KeyFrameWanted(av.error.InvalidDataError):
    """Raised from `decode` so that aiortc sends a PLI (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(errno.EAGAIN, "SFrame: waiting for a VP8 key frame after a "
                                       "dropped frame")


# -- video -----------------------------------------------------------------------


class SealingVp8Encoder(Vp8Encoder):
    """aiortc's VP8 encoder, sealing each encoded frame before packetisation."""

    def __init__(self, crypto: FrameCrypto) -> None:
        super().__init__()
        self._crypto = crypto
        self._stats = crypto.stats.video
        self._resync = False   # a frame was not sent: the next one must be a key frame

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        if self._crypto.keys.send_kid is None:
            # Fail closed without spending the CPU on encoding what cannot be sent.
            self._stats.not_sent += 1
            self._resync = True
            return [], 0
        return super().encode(frame, force_keyframe or self._resync)

    # Vp8Encoder.encode/pack call this once per encoded frame, with the whole frame.
    def _packetize(self, buffer: bytes, picture_id: int) -> list[bytes]:  # type: ignore[override]
        if not buffer:
            return []   # the rate control skipped this frame: nothing to seal
        try:
            clear = vp8_clear_bytes(buffer)
        except MalformedFrame:
            self._stats.malformed += 1
            return []
        sealed = self._crypto.seal(self._stats, buffer, clear)
        if sealed is None:
            self._resync = True
            return []
        if clear == VP8_KEY_FRAME_CLEAR:
            self._resync = False
        return Vp8Encoder._packetize(sealed, picture_id)


class OpeningVp8Decoder(Vp8Decoder):
    """aiortc's VP8 decoder behind SFrame: only authentic frames reach libvpx."""

    def __init__(self, crypto: FrameCrypto, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._crypto = crypto
        self._stats = crypto.stats.video
        self._clock = clock
        # A receiver starts at a key frame: delta frames before it would show garbage.
        self._awaiting_keyframe = True
        self._last_request = -KEYFRAME_REQUEST_INTERVAL_S

    def decode(self, encoded_frame: JitterFrame) -> list[Frame]:
        data = encoded_frame.data
        try:
            clear = vp8_clear_bytes(data)
        except MalformedFrame:
            self._stats.malformed += 1
            return self._lost()
        frame = self._crypto.open(self._stats, data, clear)
        if frame is None:
            return self._lost()
        if self._awaiting_keyframe:
            if clear != VP8_KEY_FRAME_CLEAR:
                self._stats.awaiting_keyframe += 1
                return self._want_keyframe()
            self._awaiting_keyframe = False
        try:
            return super().decode(JitterFrame(frame, encoded_frame.timestamp))
        except av.FFmpegError:
            self._awaiting_keyframe = True   # libvpx lost its references too
            raise

    def _lost(self) -> list[Frame]:
        self._awaiting_keyframe = True
        return self._want_keyframe()

    def _want_keyframe(self) -> list[Frame]:
        now = self._clock()
        if not KEYFRAME_REQUESTS or now - self._last_request < KEYFRAME_REQUEST_INTERVAL_S:
            return []
        self._last_request = now
        self._stats.keyframe_requests += 1
        raise KeyFrameWanted


# -- audio -----------------------------------------------------------------------


class SealingOpusEncoder(OpusEncoder):
    """aiortc's Opus encoder, sealing every packet whole."""

    def __init__(self, crypto: FrameCrypto) -> None:
        super().__init__()
        self._crypto = crypto
        self._stats = crypto.stats.audio

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        payloads, timestamp = super().encode(frame, force_keyframe)
        return self._seal_all(payloads), timestamp

    def pack(self, packet: Packet) -> tuple[list[bytes], int]:
        payloads, timestamp = super().pack(packet)
        return self._seal_all(payloads), timestamp

    def _seal_all(self, payloads: list[bytes]) -> list[bytes]:
        sealed: list[bytes] = []
        for payload in payloads:
            out = self._crypto.seal(self._stats, payload, OPUS_CLEAR_BYTES)
            if out is None:
                return []
            sealed.append(out)
        return sealed


class OpeningOpusDecoder(OpusDecoder):
    def __init__(self, crypto: FrameCrypto) -> None:
        super().__init__()
        self._crypto = crypto
        self._stats = crypto.stats.audio

    def decode(self, encoded_frame: JitterFrame) -> list[Frame]:
        frame = self._crypto.open(self._stats, encoded_frame.data, OPUS_CLEAR_BYTES)
        if frame is None:
            return []   # Opus frames stand alone: the next one decodes fine
        return super().decode(JitterFrame(frame, encoded_frame.timestamp))


# -- codecs without an SFrame mapping -------------------------------------------------


class RefusingEncoder(Encoder):
    def __init__(self, mime: str) -> None:
        self.mime = mime

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        return [], 0

    def pack(self, packet: Packet) -> tuple[list[bytes], int]:
        return [], 0


class RefusingDecoder(Decoder):
    def __init__(self, mime: str) -> None:
        self.mime = mime

    def decode(self, encoded_frame: JitterFrame) -> list[Frame]:
        return []


# -- switching it on ---------------------------------------------------------------

_patch_lock = threading.Lock()
_active: FrameCrypto | None = None


@contextmanager
def frame_crypto(keys: MediaKeys) -> Iterator[FrameCrypto]:
    """SFrame on every aiortc sender and receiver created while entered.

    Process-global (it swaps two aiortc module names): one participant per
    process. Senders and receivers created inside keep their codecs after exit.
    """
    global _active
    crypto = FrameCrypto(keys)
    with _patch_lock:
        if _active is not None:
            raise RuntimeError("frame crypto is already on in this process "
                               "(one participant per process)")
        saved = (aiortc.rtcrtpsender.get_encoder, aiortc.rtcrtpreceiver.get_decoder)
        # setattr: the aiortc functions are module globals, not meant to be reassigned
        setattr(aiortc.rtcrtpsender, "get_encoder", crypto.get_encoder)  # noqa: B010
        setattr(aiortc.rtcrtpreceiver, "get_decoder", crypto.get_decoder)  # noqa: B010
        _active = crypto
    try:
        yield crypto
    finally:
        with _patch_lock:
            setattr(aiortc.rtcrtpsender, "get_encoder", saved[0])  # noqa: B010
            setattr(aiortc.rtcrtpreceiver, "get_decoder", saved[1])  # noqa: B010
            _active = None
