"""SFrame around aiortc's real VP8 and Opus codecs: what is sent, what is shown."""

from __future__ import annotations

import asyncio
import os

import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
import av
import numpy as np
import pytest
from aiortc.codecs import depayload
from aiortc.codecs.vpx import VpxPayloadDescriptor
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from gateways.webrtc.keys import Drop, MediaKeys
from gateways.webrtc.media import (
    KEYFRAME_REQUEST_INTERVAL_S,
    KEYFRAME_REQUESTS,
    FrameCrypto,
    KeyFrameWanted,
    OpeningVp8Decoder,
    frame_crypto,
)
from gateways.webrtc.pattern import VIDEO_TIME_BASE, PatternPainter, ToneTrack, read_pattern
from gateways.webrtc.sframe import encode_header
from keyclient.installer import SessionKey
from keyclient.policy import KeySource
from qgw.secret import Secret

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97)
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2,
                             payloadType=96)
H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=99)
VP8_START_CODE = b"\x9d\x01\x2a"
WIDTH, HEIGHT = 320, 180


def session_key(epoch: int, secret: bytes) -> SessionKey:
    return SessionKey(epoch, KeySource.QKD, f"qkd-{epoch}", Secret(secret))


def keyed(role: str, *epochs: tuple[int, bytes]) -> MediaKeys:
    """MediaKeys holding `epochs` (epoch, secret), sending under the last one."""
    keys = MediaKeys(role)
    for epoch, secret in epochs:
        keys.install(epoch, session_key(epoch, secret))
    if epochs:
        keys.activate(epochs[-1][0])
    return keys


class Camera:
    """Pattern pictures numbered 0, 1, 2, ... with 30 fps timestamps."""

    def __init__(self) -> None:
        self.painter = PatternPainter(WIDTH, HEIGHT)
        self.number = 0

    def next(self) -> av.VideoFrame:
        frame = self.painter.paint(self.number)
        frame.pts = self.number * 3000
        frame.time_base = VIDEO_TIME_BASE
        self.number += 1
        return frame


def reassemble(payloads: list[bytes], timestamp: int) -> JitterFrame:
    """What aiortc's receiver hands its decoder: depayloaded packets, joined."""
    return JitterFrame(b"".join(depayload(VP8, p) for p in payloads), timestamp)


def shown(decoder: aiortc.codecs.base.Decoder, frame: JitterFrame) -> list[int | None]:
    return [read_pattern(f) for f in decoder.decode(frame)]  # type: ignore[arg-type]


@pytest.fixture
def secret() -> bytes:
    return os.urandom(32)


def test_vp8_pattern_survives_seal_and_open(secret: bytes) -> None:
    sender, receiver = FrameCrypto(keyed("master", (1, secret))), \
        FrameCrypto(keyed("slave", (1, secret)))
    encoder, decoder = sender.get_encoder(VP8), receiver.get_decoder(VP8)
    camera = Camera()
    seen: list[int | None] = []
    for _ in range(20):
        payloads, timestamp = encoder.encode(camera.next())
        assert payloads
        seen += shown(decoder, reassemble(payloads, timestamp))
    assert seen == list(range(20))
    assert sender.stats.video.sealed == receiver.stats.video.opened == 20
    assert sender.keys.sealed == receiver.keys.opened == 20
    assert receiver.stats.video.dropped == 0 and not receiver.keys.drops
    assert sender.stats.video.seal_ns > 0 and receiver.stats.video.open_ns > 0


def test_vp8_headers_stay_clear_and_the_rest_is_sframe(secret: bytes) -> None:
    encoder = FrameCrypto(keyed("master", (1, secret))).get_encoder(VP8)
    camera = Camera()
    key_payloads, _ = encoder.encode(camera.next())
    delta_payloads, _ = encoder.encode(camera.next())
    kid = 2   # epoch 1, sent by the master
    for counter, payloads in enumerate((key_payloads, delta_payloads)):
        # Each packet still starts with the VP8 payload descriptor (one picture ID).
        descriptors = [VpxPayloadDescriptor.parse(p)[0] for p in payloads]
        assert [d.partition_start for d in descriptors] == [1] + [0] * (len(payloads) - 1)
        assert len({d.picture_id for d in descriptors}) == 1
        first = depayload(VP8, payloads[0])
        clear = 10 if counter == 0 else 3
        if counter == 0:
            assert first[0] & 1 == 0                     # frame tag: key frame
            assert first[3:6] == VP8_START_CODE
            assert int.from_bytes(first[6:8], "little") & 0x3FFF == WIDTH
            assert int.from_bytes(first[8:10], "little") & 0x3FFF == HEIGHT
        else:
            assert first[0] & 1 == 1                     # frame tag: delta frame
        # Right after the clear bytes: the SFrame header of (KID 2, CTR n).
        header = encode_header(kid, counter)
        assert first[clear:clear + len(header)] == header


def test_frame_under_another_key_is_dropped_never_shown(secret: bytes) -> None:
    sender = FrameCrypto(keyed("master", (1, secret)))
    stranger = FrameCrypto(keyed("slave", (1, os.urandom(32))))
    now = [100.0]
    decoder = OpeningVp8Decoder(stranger, clock=lambda: now[0])
    encoder, camera = sender.get_encoder(VP8), Camera()

    payloads, timestamp = encoder.encode(camera.next())
    assert KEYFRAME_REQUESTS, "this aiortc no longer turns decoder errors into PLIs"
    # The first loss asks for a key frame (aiortc turns this error into a PLI) ...
    with pytest.raises(KeyFrameWanted) as raised:
        decoder.decode(reassemble(payloads, timestamp))
    assert isinstance(raised.value, av.FFmpegError)
    # ... later ones within the interval just drop.
    for _ in range(5):
        payloads, timestamp = encoder.encode(camera.next())
        assert decoder.decode(reassemble(payloads, timestamp)) == []
    assert stranger.keys.drops[Drop.AUTH_FAILED] == 6
    assert stranger.keys.opened == 0 and stranger.stats.video.dropped == 6
    assert stranger.stats.video.keyframe_requests == 1
    now[0] += KEYFRAME_REQUEST_INTERVAL_S
    payloads, timestamp = encoder.encode(camera.next())
    with pytest.raises(KeyFrameWanted):
        decoder.decode(reassemble(payloads, timestamp))
    assert stranger.stats.video.keyframe_requests == 2


def test_frame_under_a_retired_kid_counts_as_unknown_key(secret: bytes) -> None:
    sender = FrameCrypto(keyed("master", (1, secret)))
    receiver_keys = keyed("slave", (1, secret), (2, os.urandom(32)))
    receiver_keys.retire(1)
    receiver = FrameCrypto(receiver_keys)
    payloads, timestamp = sender.get_encoder(VP8).encode(Camera().next())
    decoder = OpeningVp8Decoder(receiver)
    with pytest.raises(KeyFrameWanted):
        decoder.decode(reassemble(payloads, timestamp))
    assert receiver_keys.drops == {Drop.UNKNOWN_KEY: 1}


@pytest.mark.parametrize("offset", [0, 6, 12, -1],
                         ids=["frame-tag", "width", "ciphertext", "auth-tag"])
def test_tampered_frame_is_dropped(secret: bytes, offset: int) -> None:
    sender = FrameCrypto(keyed("master", (1, secret)))
    receiver = FrameCrypto(keyed("slave", (1, secret)))
    payloads, timestamp = sender.get_encoder(VP8).encode(Camera().next())
    frame = bytearray(reassemble(payloads, timestamp).data)
    # Byte 0 is the clear frame tag: flipping its bit 1 (not the key-frame bit)
    # must fail authentication like any other byte.
    frame[offset] ^= 0x02
    decoder = OpeningVp8Decoder(receiver)
    with pytest.raises(KeyFrameWanted):
        decoder.decode(JitterFrame(bytes(frame), timestamp))
    assert receiver.keys.drops == {Drop.AUTH_FAILED: 1}
    assert receiver.stats.video.opened == 0


def test_after_a_drop_video_waits_for_a_key_frame(secret: bytes) -> None:
    sender = FrameCrypto(keyed("master", (1, secret)))
    receiver = FrameCrypto(keyed("slave", (1, secret)))
    now = [0.0]
    encoder, decoder = sender.get_encoder(VP8), OpeningVp8Decoder(receiver,
                                                                  clock=lambda: now[0])
    camera = Camera()
    frames = [reassemble(*encoder.encode(camera.next())) for _ in range(4)]
    assert shown(decoder, frames[0]) == [0]
    with pytest.raises(KeyFrameWanted):
        decoder.decode(JitterFrame(frames[1].data[:-1], frames[1].timestamp))  # truncated
    # Frames 2 and 3 are authentic but refer to the lost one: not decoded.
    assert decoder.decode(frames[2]) == [] and decoder.decode(frames[3]) == []
    assert receiver.stats.video.awaiting_keyframe == 2
    assert receiver.stats.video.opened == 3
    payloads, timestamp = encoder.encode(camera.next(), force_keyframe=True)
    assert shown(decoder, reassemble(payloads, timestamp)) == [4]


def test_a_receiver_starts_at_a_key_frame(secret: bytes) -> None:
    sender = FrameCrypto(keyed("master", (1, secret)))
    receiver = FrameCrypto(keyed("slave", (1, secret)))
    encoder, camera = sender.get_encoder(VP8), Camera()
    encoder.encode(camera.next())            # the key frame this receiver missed
    decoder = OpeningVp8Decoder(receiver)
    with pytest.raises(KeyFrameWanted):
        decoder.decode(reassemble(*encoder.encode(camera.next())))
    assert receiver.stats.video.awaiting_keyframe == 1


def test_no_key_sends_nothing_then_starts_with_a_key_frame(secret: bytes) -> None:
    keys = MediaKeys("master")
    crypto = FrameCrypto(keys)
    encoder, camera = crypto.get_encoder(VP8), Camera()
    for _ in range(3):
        assert encoder.encode(camera.next()) == ([], 0)
    assert crypto.stats.video.not_sent == 3 and crypto.stats.video.sealed == 0
    keys.install(1, session_key(1, secret))
    keys.activate(1)
    for _ in range(3):
        encoder.encode(camera.next())        # a key frame, then delta frames
    # The key is retired under the running encoder: nothing goes out in clear ...
    keys.install(2, session_key(2, secret))
    keys.retire(1)
    payloads, _ = encoder.encode(camera.next())
    assert payloads == []
    assert crypto.stats.video.not_sent == 4
    # ... and the first frame under the next key is a key frame, so receivers resume.
    keys.activate(2)
    payloads, _ = encoder.encode(camera.next())
    first = depayload(VP8, payloads[0])
    assert first[0] & 1 == 0 and first[3:6] == VP8_START_CODE


def test_opus_is_sealed_whole(secret: bytes) -> None:
    sender = FrameCrypto(keyed("master", (1, secret)))
    receiver = FrameCrypto(keyed("slave", (1, secret)))
    stranger = FrameCrypto(keyed("slave", (1, os.urandom(32))))
    encoder = sender.get_encoder(OPUS)
    decoder, stranger_decoder = receiver.get_decoder(OPUS), stranger.get_decoder(OPUS)

    async def tone(count: int) -> list[av.AudioFrame]:
        track = ToneTrack()
        return [await track.recv() for _ in range(count)]

    samples = 0
    sealed = 0
    for frame in asyncio.run(tone(10)):
        payloads, timestamp = encoder.encode(frame)
        for payload in payloads:
            assert payload.startswith(encode_header(2, sealed))   # nothing before it
            sealed += 1
            audio = decoder.decode(JitterFrame(payload, timestamp))
            assert all(isinstance(f, av.AudioFrame) for f in audio)
            assert stranger_decoder.decode(JitterFrame(payload, timestamp)) == []
            samples += sum(f.samples for f in audio)  # type: ignore[attr-defined]
            pcm = np.concatenate([f.to_ndarray().ravel() for f in audio])  # type: ignore[attr-defined]
            assert np.abs(pcm).max() > 1000               # the tone, not silence
    assert sealed >= 8 and samples == sealed * 960
    assert receiver.stats.audio.opened == sealed
    assert stranger.keys.drops == {Drop.AUTH_FAILED: sealed}
    assert stranger.stats.audio.dropped == sealed
    assert receiver.stats.video.opened == 0          # counted per kind


def test_codecs_without_an_sframe_mapping_send_and_show_nothing(secret: bytes) -> None:
    crypto = FrameCrypto(keyed("master", (1, secret)))
    encoder = crypto.get_encoder(H264)
    assert encoder.encode(Camera().next()) == ([], 0)
    assert crypto.get_decoder(H264).decode(JitterFrame(b"\x00\x00\x01\x65", 0)) == []
    assert crypto.stats.unsupported_codecs == ["video/h264"]


def test_frame_crypto_patches_aiortc_once_and_restores_it(secret: bytes) -> None:
    original = (aiortc.rtcrtpsender.get_encoder, aiortc.rtcrtpreceiver.get_decoder)
    keys = keyed("master", (1, secret))
    with frame_crypto(keys) as crypto:
        assert aiortc.rtcrtpsender.get_encoder == crypto.get_encoder
        assert aiortc.rtcrtpreceiver.get_decoder == crypto.get_decoder
        assert type(aiortc.rtcrtpsender.get_encoder(VP8)).__name__ == "SealingVp8Encoder"
        with pytest.raises(RuntimeError, match="one participant per process"), \
                frame_crypto(keys):
            pass
        assert aiortc.rtcrtpsender.get_encoder == crypto.get_encoder
        snapshot = crypto.snapshot()
    assert (aiortc.rtcrtpsender.get_encoder, aiortc.rtcrtpreceiver.get_decoder) == original
    assert snapshot["keys"]["send_kid"] == 2 and snapshot["keys"]["rotations"] == 1
    assert secret.hex() not in repr(snapshot)
