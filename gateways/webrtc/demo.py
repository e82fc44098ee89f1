"""The WebRTC step of `qgw demo`: an end-to-end encrypted video call keyed by QKD (UC32).

Two `qgw gateway webrtc` participants in network namespaces (`lab.CallLab`), a
pattern camera and a tone each way, every frame SFrame-sealed under keys from
an ETSI 004 stream, the KID rotated every `interval_s`. Each side checks every
picture it decodes: the sent pattern, in order, and nothing undecodable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateways.webrtc.lab import CallLab
from qgw.netlab import temporary_lab

KEY_BITS = 256   # one QKD key per rotation
UC32_POST_PROCESSING_BPS = 5_000.0   # D8.7 UC32: error correction + PA without GPU


@dataclass
class WebrtcResult:
    rotation_interval_s: float = 2.0
    first_picture_s: float = 0.0        # gateways started to the first verified picture
    rotations: int = 0                  # during the measured call
    sides: dict[str, dict[str, float]] = field(default_factory=dict)   # a / b call counters
    key_sources: list[str] = field(default_factory=list)

    @property
    def shown(self) -> int:
        return int(sum(s["pattern_ok"] for s in self.sides.values()))

    @property
    def dropped(self) -> int:
        return int(sum(s["video_dropped"] for s in self.sides.values()))

    @property
    def garbage(self) -> int:
        return int(sum(s["garbage"] for s in self.sides.values()))

    @property
    def lost(self) -> int:
        return int(sum(s["lost"] for s in self.sides.values()))

    @property
    def key_bits_per_hour(self) -> float:
        return KEY_BITS * 3600 / self.rotation_interval_s

    @property
    def ok(self) -> bool:
        return (self.rotations > 0 and self.shown > 0 and self.garbage == 0
                and self.dropped == 0 and len(self.sides) == 2)


def run_webrtc(seconds: float = 20.0, interval_s: float = 2.0,
               progress: Callable[[str], None] = lambda s: None) -> WebrtcResult:
    result = WebrtcResult(rotation_interval_s=interval_s)
    with temporary_lab("qgw-webrtc-", "the WebRTC step") as (lab, tmp):
        progress("WebRTC: signalling server, two KMEs and two participants in namespaces")
        call = CallLab(lab, tmp, keys={"rekey_interval_s": interval_s, "overlap_s": 1.0})
        started = time.monotonic()
        call.start()
        progress("WebRTC: agreeing the first key over ETSI 004, setting up the call")
        call.wait_for("b", "pattern_ok", 1)
        result.first_picture_s = time.monotonic() - started
        before = {s: call.metrics(s) for s in "ab"}
        progress(f"WebRTC: {seconds:g} s of video and audio each way, a new KID every "
                 f"{interval_s:g} s")
        time.sleep(seconds)
        after = {s: call.metrics(s) for s in "ab"}
        for s in "ab":
            result.sides[s] = {c: call.call_counter(s, c, after[s])
                               for c in ("pattern_ok", "video_dropped", "garbage", "lost",
                                         "seal_us_per_video_frame",
                                         "open_us_per_video_frame")}
        rot = "qgw_webrtc_rotations_total"
        result.rotations = int(after["a"].get(rot, 0) - before["a"].get(rot, 0))
        result.key_sources = sorted(
            k.split('source="')[1].split('"')[0] for k, v in after["a"].items()
            if k.startswith("qgw_session_key_source{") and v == 1.0)
    return result
