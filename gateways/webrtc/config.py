"""Configuration of a WebRTC gateway (`qgw gateway webrtc --config FILE`).

One participant of a two-party call. The camera side (the key master: opens
the ETSI 004 stream and offers each key to the other side):

    role: master
    sae: SAE_A                         # this participant's SAE ID (pki/sae/)
    pki: /state/pki
    kme: https://kme-a:8443            # its KME: ETSI 004 streams (key_api: "004")
    peer: {sae: SAE_B, control: "gw-b:7301"}
    keys: {mode: qkd, rekey_interval_s: 10, grace_s: 20}   # keyclient SessionPolicy
    call: {signal: "http://videocall:8080", room: quantum, name: camera}
    media: aiortc                      # a headless aiortc participant (pattern camera)
    metrics: {host: 0.0.0.0, port: 9620}

The other side has `role: slave`, `control_listen: {host: 0.0.0.0, port: 7301}`
instead of `peer.control`, and either `media: aiortc` too or `media: browser`:
then the gateway does no media itself and hands its keys to the browser page
of the same participant over `handoff` (a WebSocket on loopback with a
per-run token; the page does SFrame with WebCrypto).

`rekey_interval_s` is the rotation budget: every rotation is a new QKD key
and a new SFrame KID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, Field, model_validator

from gateways.config import PairConfig, Strict
from gateways.webrtc.sframe import CipherSuite
from keyclient.policy import SessionPolicy
from qgw.config import load_model

SUITES = {"AES_256_GCM_SHA512_128": CipherSuite.AES_256_GCM_SHA512_128,
          "AES_128_GCM_SHA256_128": CipherSuite.AES_128_GCM_SHA256_128}


class Call(Strict):
    signal: AnyHttpUrl               # the videocall signalling server
    room: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w.-]+$")] = "quantum"
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w.-]+$")]


class Video(Strict):
    width: Annotated[int, Field(ge=16, le=3840, multiple_of=2)] = 640
    height: Annotated[int, Field(ge=16, le=2160, multiple_of=2)] = 360
    fps: Annotated[int, Field(ge=1, le=60)] = 30


class Handoff(Strict):
    """Where the browser page of this participant gets its keys (loopback only)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8765
    origins: list[str] = Field(default_factory=list)  # allowed pages; empty: the call server


class WebrtcConfig(PairConfig):
    key_api: Literal["004", "014"] = "004"
    suite: Literal["AES_256_GCM_SHA512_128", "AES_128_GCM_SHA256_128"] = \
        "AES_256_GCM_SHA512_128"
    keys: SessionPolicy = SessionPolicy(rekey_interval_s=10.0, grace_s=20.0)
    call: Call
    media: Literal["aiortc", "browser"] = "aiortc"
    video: Video = Video()
    handoff: Handoff = Handoff()

    @model_validator(mode="after")
    def _shape(self) -> WebrtcConfig:
        if self.media == "browser" and self.handoff.host not in ("127.0.0.1", "localhost"):
            # IPv4 loopback only: the page's Content-Security-Policy cannot name [::1].
            raise ValueError("handoff.host must be 127.0.0.1 or localhost: it hands out keys")
        return self

    @property
    def cipher_suite(self) -> CipherSuite:
        return SUITES[self.suite]

    @property
    def page_origins(self) -> list[str]:
        if self.handoff.origins:
            return self.handoff.origins
        url = self.call.signal
        port = f":{url.port}" if url.port not in (None, 80, 443) else ""
        return [f"{url.scheme}://{url.host}{port}"]


def load(path: Path) -> WebrtcConfig:
    return load_model(path, WebrtcConfig, env_prefix="QGW_WEBRTC")
