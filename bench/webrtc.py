"""Benchmark: SFrame (RFC 9605) on the WebRTC gateway's aiortc media path, against plain aiortc.

What encryption adds is measured against a baseline taken in the same run, on the
same machine, from the same source: the test-pattern camera (`pattern.PatternTrack`,
big black/white cells carrying the frame number), VP8 as aiortc encodes it.

- frame cost: a few hundred (--frames) real 1280x720 VP8 frames of the pattern, from
  aiortc's `Vp8Encoder` at its default target (500 kbit/s) and at 2.5 Mbit/s (above
  aiortc's 1.5 Mbit/s clamp: set on the encoder's private field), each frame timed
  through encode -> `MediaKeys.seal` -> `MediaKeys.open` -> decode (AES-256-GCM, the
  gateway's default suite; the VP8 frame's first 3 or 10 bytes stay in the clear, as
  in the call). p50/p99 in microseconds, and the ratio (seal + open) / (encode +
  decode): what encryption adds to the codec's CPU time per frame. The pattern is
  easy to compress (under 2 kB a frame whatever the target), so seal/open are
  also timed on random frames of target / 8 / 30 bytes, the size a camera at that
  bitrate gives. Sealing once per frame between codec calls, as a call does, costs
  several times what sealing back to back does (caches and branch predictors are
  cold; a 5 ms sleep in between costs as much): both are reported, the first is
  the one a call pays. So is the in-call figure the participants report
  (seal_us_per_video_frame / open_us_per_video_frame, SFrame call below; wall time
  in a codec thread that shares the GIL with the event loop and the other codecs,
  so it also holds some of their time).
- glass-to-glass latency: two participants (`bench.webrtc_peer`), each a process of
  its own, in calls over loopback through the signalling server
  (apps.videocall.server), both sending the pattern at --width x --height, 30 fps,
  and a tone. The sender records when each frame number was made (after the pacing
  sleep), the receiver when the picture carrying that number came out of the
  decoder (`Participant(frame_times=True)`): CLOCK_MONOTONIC is one clock for every
  process of the machine, so latency = shown - made, both directions pooled, over
  the frames made in a window of each call that starts 2 s after the call's first
  frame (the first key frame and aiortc's bitrate ramp are left out).
  Eight calls one after the other between the same two processes, plain aiortc
  (`Participant(crypto=False)`, the baseline) and SFrame in the order P S S P P S S P,
  each with a window of --seconds / 4: each mode gets --seconds of window, and load
  drifting on the machine weighs on both alike. Each call is also reported apart,
  with the load average at its start, and the ratios are given both of the pooled
  quantiles and of the median over a mode's four calls of their p50 / p95 (robust to
  one call hit by a burst of load from elsewhere).
  640x360 by default: at 1280x720 this 2-core machine, shared, did not keep up
  (all frames shown, but p50 ~80 ms and p95 200-300 ms in plain aiortc as well).
- loss across rotations: an SFrame call with a new key every --interval seconds for
  --rotations rotations: pattern numbers never shown (gaps), SFrame drops by reason
  (both ends, video and audio), lost per rotation (target 0), and the loss rate of
  the calls without rotation next to it (what the call loses anyway). Each lost
  frame is placed by when it was made: within 0.5 s of a key switch or not.
- QKD key: one 256-bit QKD key per rotation (it keys both directions: two SFrame
  base keys by HKDF) per hour of call at rotation intervals of 1 s and 10 s (and
  --interval), as a fraction of use case 32's figures (OPENQKD D8.7): the QKD link's
  112 kbit/s asymptotic secret key rate at 5.5 dB, error correction + privacy
  amplification at 5 kbit/s without a GPU and 70 kbit/s with one; and the hours of
  call the 4.2 Mbit (4.2e6 bits) extracted in the field test would key.

Keys in the calls are driven directly, not by KMEs: both participants hold
`MediaKeys` fed the same `SessionKey`s, derived from a seed the benchmark hands
both over a pipe, activated on one CLOCK_MONOTONIC schedule, make-before-break as
a KeySession pair does (install 0.5 s before, or half the interval if shorter,
retire as long after). This isolates the media path; key delivery is measured by
bench.key_delivery, the namespaced lab with real KMEs and gateways is
gateways.webrtc.lab.CallLab (tests/gateways/webrtc/test_call_netns.py).

Everything runs on this machine's cores, shared with whatever else runs: the load
average before and after is recorded, absolute figures carry it, ratios compare
runs made minutes apart. Nothing needs root. No key material is printed or written.

Run: python -m bench.webrtc [--seconds 20] [--rotations 30] [--interval 1]
                            [--frames 300] [--width 640 --height 360]
                            [--out bench/results/webrtc.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiortc
import av
from aiortc.codecs.vpx import DEFAULT_BITRATE, Vp8Decoder, Vp8Encoder
from aiortc.jitterbuffer import JitterFrame

from bench.webrtc_peer import CALL_GAP_S
from gateways.webrtc.keys import MediaKeys
from gateways.webrtc.pattern import VIDEO_TIME_BASE, PatternPainter, read_pattern
from gateways.webrtc.sframe import VP8_DELTA_FRAME_CLEAR, vp8_clear_bytes
from keyclient.installer import SessionKey
from keyclient.policy import KeySource
from qgw.secret import Secret

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
CODEC_SIZE = (1280, 720)
CODEC_FPS = 30
TICKS_PER_FRAME = 90_000 // CODEC_FPS
BITRATES = {"default": DEFAULT_BITRATE, "2.5M": 2_500_000}
CALL_UP_S = 1.5     # t0 -> the first frame: ICE and DTLS on loopback, ~0.1 s when idle
SETUP_S = 4.0       # t0 -> the first key rotation: the call is up and past its warm-up
WARMUP_S = 2.0      # left out of every latency window
TAIL_S = 2.0        # the call runs on past the window: its last frames are in flight
# ABBA twice: linear drift cancels, and a burst of load lands in one short call of
# one mode rather than in half of a mode's samples.
LATENCY_MODES = ("plain", "sframe", "sframe", "plain") * 2
NEAR_SWITCH_S = 0.5
READY_TIMEOUT_S = 90.0
KEY_BITS = 256
FIELD_TEST_BITS = 4.2e6
TRIAL_BPS = {   # use case 32, OPENQKD D8.7
    "qkd_112k": 112e3,        # QKD secret key rate, asymptotic, at 5.5 dB
    "ecpa_cpu_5k": 5e3,       # error correction + privacy amplification, no GPU
    "ecpa_gpu_70k": 70e3,     # ... with a GPU
}


# ---- small statistics ---------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def _us(ns: list[int]) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v / 1e3, 2)
    values = [float(v) for v in ns]
    return {"n": len(ns), "p50_us": r(_pct(values, 0.5)), "p99_us": r(_pct(values, 0.99)),
            "mean_us": r(statistics.fmean(values) if values else None)}


def _ms(seconds: list[float]) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v * 1e3, 2)
    return {"n": len(seconds), "p50_ms": r(_pct(seconds, 0.5)),
            "p95_ms": r(_pct(seconds, 0.95)), "p99_ms": r(_pct(seconds, 0.99)),
            "max_ms": r(max(seconds, default=None)),
            "mean_ms": r(statistics.fmean(seconds) if seconds else None)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


# ---- 1. per-frame cost: VP8 and SFrame in one thread ----------------------------------------


class _CapturingEncoder(Vp8Encoder):
    """aiortc's VP8 encoder keeping its last encoded frame: what SFrame seals in a call."""

    frame = b""

    # Vp8Encoder.encode calls this once per encoded frame (see gateways.webrtc.media).
    def _packetize(self, buffer: bytes, picture_id: int) -> list[bytes]:  # type: ignore[override]
        self.frame = buffer
        return Vp8Encoder._packetize(buffer, picture_id)


def _key_pair() -> tuple[MediaKeys, MediaKeys]:
    """Two ends holding one fresh random key (never shown), master sending to slave."""
    key = SessionKey(1, KeySource.QKD, "bench", Secret(os.urandom(32)))
    pair = (MediaKeys("master"), MediaKeys("slave"))
    for keys in pair:
        keys.install(1, key)
        keys.activate(1)
    return pair


def _frame_cost(frames: int, bitrate: int) -> dict[str, Any]:
    painter = PatternPainter(*CODEC_SIZE)
    encoder, decoder = _CapturingEncoder(), Vp8Decoder()
    if bitrate != DEFAULT_BITRATE:
        # The target_bitrate setter clamps to aiortc's MAX_BITRATE (1.5 Mbit/s);
        # encode() reads the field behind it.
        setattr(encoder, "_Vp8Encoder__target_bitrate", bitrate)  # noqa: B010
    sender, receiver = _key_pair()
    enc_ns: list[int] = []
    dec_ns: list[int] = []
    seal_ns: list[int] = []
    open_ns: list[int] = []
    sizes: list[int] = []
    overhead: list[int] = []
    kept: list[tuple[bytes, int]] = []
    key_frames = skipped = shown = 0
    clock = time.perf_counter_ns
    for n in range(frames):
        picture = painter.paint(n)
        picture.pts = n * TICKS_PER_FRAME
        picture.time_base = VIDEO_TIME_BASE
        t = clock()
        encoder.encode(picture)
        enc_ns.append(clock() - t)
        data = encoder.frame
        if not data:
            skipped += 1      # the rate control dropped it: nothing to seal or decode
            continue
        clear = vp8_clear_bytes(data)
        key_frames += clear != VP8_DELTA_FRAME_CLEAR
        t = clock()
        sealed = sender.seal(data, clear)
        seal_ns.append(clock() - t)
        assert sealed is not None
        t = clock()
        opened = receiver.open(sealed, clear)
        open_ns.append(clock() - t)
        if opened != data:
            raise RuntimeError("a sealed VP8 frame did not open to itself")
        t = clock()
        pictures = decoder.decode(JitterFrame(opened, picture.pts))
        dec_ns.append(clock() - t)
        shown += sum(read_pattern(p) == n for p in pictures)  # type: ignore[arg-type]
        sizes.append(len(data))
        overhead.append(len(sealed) - len(data))
        kept.append((data, clear))
    # The same frames again, sealed back to back and then opened back to back: the
    # warm-cache floor, next to the figure above (once per frame between codec calls).
    warm_seal: list[int] = []
    warm_open: list[int] = []
    sealed_all: list[tuple[bytes, int]] = []
    for data, clear in kept:
        t = clock()
        sealed = sender.seal(data, clear)
        warm_seal.append(clock() - t)
        assert sealed is not None
        sealed_all.append((sealed, clear))
    for sealed, clear in sealed_all:
        t = clock()
        receiver.open(sealed, clear)
        warm_open.append(clock() - t)
    codec = encoder.codec
    res: dict[str, Any] = {
        "target_bps": bitrate, "codec_bit_rate": codec.bit_rate if codec else None,
        "frames": frames, "encoded": len(sizes), "skipped_by_rate_control": skipped,
        "key_frames": key_frames, "decoded_with_their_number": shown,
        "frame_bytes": {"mean": round(statistics.fmean(sizes)), "p50": _pct(sizes, 0.5),
                        "max": max(sizes)},
        "encoded_kbit_s": round(statistics.fmean(sizes) * 8 * CODEC_FPS / 1e3, 1),
        "sframe_overhead_bytes": round(statistics.fmean(overhead), 2),
        "encode": _us(enc_ns), "decode": _us(dec_ns), "seal": _us(seal_ns),
        "open": _us(open_ns), "seal_back_to_back": _us(warm_seal),
        "open_back_to_back": _us(warm_open),
    }
    for stat in ("p50", "mean"):
        sframe = res["seal"][f"{stat}_us"] + res["open"][f"{stat}_us"]
        media = res["encode"][f"{stat}_us"] + res["decode"][f"{stat}_us"]
        res[f"sframe_over_codec_{stat}"] = _ratio(sframe, media)
    res["camera_sized"] = _sized_cost(bitrate // 8 // CODEC_FPS, len(sizes))
    return res


def _sized_cost(size: int, frames: int) -> dict[str, Any]:
    """seal/open of random delta frames of `size` bytes (a camera's, at the target)."""
    sender, receiver = _key_pair()
    seal_ns: list[int] = []
    open_ns: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(frames):
        data = b"\x01" + os.urandom(size - 1)     # bit 0 set: a VP8 delta frame
        t = clock()
        sealed = sender.seal(data, VP8_DELTA_FRAME_CLEAR)
        seal_ns.append(clock() - t)
        assert sealed is not None
        t = clock()
        opened = receiver.open(sealed, VP8_DELTA_FRAME_CLEAR)
        open_ns.append(clock() - t)
        if opened != data:
            raise RuntimeError("a sealed frame did not open to itself")
    return {"frame_bytes": size, "seal": _us(seal_ns), "open": _us(open_ns)}


# ---- 2 and 3. calls between two participant processes -------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_line(stream: IO[str], timeout_s: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            return ""
    return stream.readline().strip()


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None and not pipe.closed:
            pipe.close()


@dataclass
class Calls:
    """The signalling server and the participants' logs of one benchmark run."""

    tmp: Path
    signal_url: str
    width: int
    height: int
    fps: float

    def run(self, room: str, modes: Sequence[str], call_seconds: float, *,
            rotations: int = 0, interval: float = 1.0,
            ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Calls one after the other, one per mode, `call_seconds` apart, between the
        same two participant processes: per call, the master's and the slave's results."""
        lead = min(0.5, interval / 2)
        procs: list[subprocess.Popen[str]] = []
        logs: list[Path] = []
        try:
            for role, name in (("master", "alice"), ("slave", "bob")):
                argv = [PY, "-m", "bench.webrtc_peer", "--signal", self.signal_url,
                        "--room", room, "--name", name, "--role", role,
                        "--modes", ",".join(modes), "--call-seconds", str(call_seconds),
                        "--width", str(self.width), "--height", str(self.height),
                        "--fps", str(self.fps), "--rotations", str(rotations),
                        "--interval", str(interval), "--rotate-from", str(SETUP_S),
                        "--lead", str(lead)]
                log = self.tmp / f"{room}-{name}.log"
                logs.append(log)
                with log.open("w") as stderr:
                    procs.append(subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE,
                                                  stdout=subprocess.PIPE, stderr=stderr,
                                                  text=True))
            for proc, log in zip(procs, logs, strict=True):
                assert proc.stdout is not None
                if _read_line(proc.stdout, READY_TIMEOUT_S) != "ready":
                    raise RuntimeError(f"{log.name} did not start:\n{_tail(log)}")
            # One schedule and one key seed for both; the seed only ever crosses a pipe.
            start = json.dumps({"t0": time.monotonic() + 0.5, "seed": os.urandom(16).hex()})
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(start + "\n")
                proc.stdin.flush()
            results = []
            for proc, log in zip(procs, logs, strict=True):
                out, _ = proc.communicate(timeout=len(modes) * call_seconds + 60)
                if proc.returncode != 0:
                    raise RuntimeError(f"{log.name} failed:\n{_tail(log)}")
                results.append(json.loads(out.strip().splitlines()[-1])["calls"])
            return list(zip(results[0], results[1], strict=True))
        finally:
            for proc in procs:
                _stop(proc)


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _window(sender: dict[str, Any], seconds: float) -> tuple[float, float]:
    """Frames made in [first + WARMUP_S, + seconds) count (monotonic)."""
    created = sender["created"]
    if not created:
        raise RuntimeError("the sender made no frame: the call never came up")
    return created[0] + WARMUP_S, created[0] + WARMUP_S + seconds


def _latencies(sender: dict[str, Any], receiver: dict[str, Any],
               window: tuple[float, float]) -> tuple[list[float], int]:
    """shown - made of the frames made in `window`, and how many were made there."""
    created = sender["created"]
    # Pattern numbers wrap at 2^16 frames (36 min at 30 fps): far beyond a call.
    made = sum(window[0] <= t < window[1] for t in created)
    out = [shown - created[number] for number, shown in receiver["shown"]
           if number < len(created) and window[0] <= created[number] < window[1]]
    return out, made


def _call_counters(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What both receivers saw (summed over the two directions)."""
    out: dict[str, Any] = {}
    for key in ("video_sent", "video_decoded", "pattern_ok", "garbage", "lost", "duplicates",
                "out_of_order", "video_dropped", "keyframe_requests", "audio_received"):
        out[key] = a["stats"][key] + b["stats"][key]
    out["connected"] = [a["stats"]["connected"], b["stats"]["connected"]]
    out["call_up_s"] = [round(r["created"][0] - r["t0"], 2) if r["created"] else None
                        for r in (a, b)]   # t0 -> its camera's first frame
    spans = [r["shown"][-1][1] - r["shown"][0][1] for r in (a, b) if r["shown"]]
    out["shown_span_s"] = round(statistics.fmean(spans), 2) if spans else 0.0
    if a["stats"]["crypto"]:
        out["seal_us_per_video_frame"] = [r["stats"]["seal_us_per_video_frame"] for r in (a, b)]
        out["open_us_per_video_frame"] = [r["stats"]["open_us_per_video_frame"] for r in (a, b)]
        drops: dict[str, int] = {}
        for r in (a, b):
            for reason, n in r["stats"]["crypto"]["keys"]["drops"].items():
                drops[reason] = drops.get(reason, 0) + n
        out["sframe_drops"] = drops
        out["rotations"] = [r["stats"]["crypto"]["keys"]["rotations"] - 1 for r in (a, b)]
    return out


def _latency_call(a: dict[str, Any], b: dict[str, Any], seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    made = 0
    directions: dict[str, Any] = {}
    for name, sender, receiver in (("alice->bob", a, b), ("bob->alice", b, a)):
        values, n = _latencies(sender, receiver, _window(sender, seconds))
        directions[name] = {"p50_ms": _ms(values)["p50_ms"], "shown": len(values), "made": n}
        lat += values
        made += n
    return {"mode": a["mode"], "window_s": seconds, "loadavg_1m": a["loadavg_1m"],
            "latency": _ms(lat), "samples": lat, "made_in_window": made,
            "shown_of_made": round(len(lat) / made, 4) if made else None,
            "directions": directions, "counters": _call_counters(a, b)}


def _latency(calls: Calls, seconds: float) -> dict[str, Any]:
    """The LATENCY_MODES calls, each mode's windows adding up to `seconds`; pooled by mode,
    and the median over a mode's calls of their p50 and p95 (a call hit by a burst of
    load elsewhere on the machine moves that less than the pooled quantiles)."""
    window = seconds / LATENCY_MODES.count("sframe")
    pairs = calls.run("latency", LATENCY_MODES,
                      CALL_UP_S + WARMUP_S + window + TAIL_S + CALL_GAP_S)
    per_call = [_latency_call(a, b, window) for a, b in pairs]
    pooled = {mode: [v for c in per_call if c["mode"] == mode for v in c["samples"]]
              for mode in ("plain", "sframe")}
    plain, sframe = _ms(pooled["plain"]), _ms(pooled["sframe"])
    for call in per_call:
        call["samples"] = [round(v * 1e3, 3) for v in call["samples"]]   # ms, for the file
    added = (None if plain["p50_ms"] is None or sframe["p50_ms"] is None
             else round(sframe["p50_ms"] - plain["p50_ms"], 2))
    median_of_calls: dict[str, dict[str, float | None]] = {}
    for mode in ("plain", "sframe"):
        median_of_calls[mode] = {}
        for q in ("p50_ms", "p95_ms"):
            values = [c["latency"][q] for c in per_call
                      if c["mode"] == mode and c["latency"][q] is not None]
            median_of_calls[mode][q] = statistics.median(values) if values else None
    return {"size": f"{calls.width}x{calls.height}", "fps": calls.fps,
            "order": list(LATENCY_MODES), "window_s_per_call": window, "calls": per_call,
            "plain": plain, "sframe": sframe,
            "ratio_p50": _ratio(sframe["p50_ms"], plain["p50_ms"]),
            "ratio_p95": _ratio(sframe["p95_ms"], plain["p95_ms"]), "added_p50_ms": added,
            "median_of_calls": median_of_calls,
            "ratio_p50_median_of_calls": _ratio(median_of_calls["sframe"]["p50_ms"],
                                                median_of_calls["plain"]["p50_ms"]),
            "ratio_p95_median_of_calls": _ratio(median_of_calls["sframe"]["p95_ms"],
                                                median_of_calls["plain"]["p95_ms"])}


def _rotation(calls: Calls, rotations: int, interval: float) -> dict[str, Any]:
    seconds = SETUP_S + (rotations - 1) * interval + max(interval, 1.0) + TAIL_S + CALL_GAP_S
    [(a, b)] = calls.run("rotating", ["sframe"], seconds, rotations=rotations,
                         interval=interval)
    lost_near = lost_far = 0
    in_call = 0
    for sender, receiver in ((a, b), (b, a)):
        created, switches = sender["created"], sender["activated"]
        numbers = sorted({number for number, _ in receiver["shown"]})
        if not numbers:
            raise RuntimeError("no picture was shown in the rotation call")
        # Switches the picture flowed across (the call was up on both sides).
        first, last = receiver["shown"][0][1], receiver["shown"][-1][1]
        in_call = max(in_call, sum(first < t < last for t in switches))
        missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
        for number in missing:
            made = created[number]
            if any(abs(made - t) <= NEAR_SWITCH_S for t in switches):
                lost_near += 1
            else:
                lost_far += 1
    counters = _call_counters(a, b)
    drops = sum(counters["sframe_drops"].values())
    return {"interval_s": interval, "rotations": rotations,
            "rotations_in_call": in_call, "loadavg_1m": a["loadavg_1m"],
            "lost": counters["lost"], "lost_near_switch": lost_near,
            "lost_elsewhere": lost_far, "sframe_drops": counters["sframe_drops"],
            "lost_per_rotation": _ratio(counters["lost"], in_call),
            "sframe_drops_per_rotation": _ratio(drops, in_call),
            "lost_per_s": _ratio(counters["lost"], counters["shown_span_s"]),
            "first_numbers": [r["stats"]["first_number"] for r in (a, b)],
            "counters": counters}


# ---- 4. QKD key per hour of call -----------------------------------------------------------


def _key_budget(intervals: list[float]) -> dict[str, Any]:
    rows = {}
    for interval in sorted(set(intervals)):
        bps = KEY_BITS / interval
        per_hour = bps * 3600
        rows[f"{interval:g}s"] = {
            "interval_s": interval, "key_bits_per_h": per_hour,
            "fraction_of": {name: bps / rate for name, rate in TRIAL_BPS.items()},
            "hours_keyed_by_field_test_4_2_mbit": FIELD_TEST_BITS / per_hour,
        }
    return {"key_bits_per_rotation": KEY_BITS, "trial_bps": TRIAL_BPS,
            "field_test_bits": FIELD_TEST_BITS, "rows": rows}


# ---- the run -------------------------------------------------------------------------------


def _signalling(tmp: Path) -> tuple[subprocess.Popen[str], str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp / "signal.log").open("w")
    server = subprocess.Popen([PY, "-m", "apps.videocall.server", "--host", "127.0.0.1",
                               "--port", str(port), "--log-level", "WARNING"],
                              cwd=REPO, stdout=log, stderr=log, text=True)
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the signalling server exited:\n{_tail(tmp / 'signal.log')}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as reply:  # noqa: S310
                if reply.read() == b"ok":
                    return server, url
        except OSError:
            time.sleep(0.2)
    _stop(server)
    raise RuntimeError("the signalling server did not come up")


def run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v
                                    for k, v in vars(args).items()},
                           "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                           "aiortc": aiortc.__version__, "av": av.__version__}
    print(f"frame cost: {args.frames} frames of {CODEC_SIZE[0]}x{CODEC_SIZE[1]} VP8", flush=True)
    res["frame_cost"] = {name: _frame_cost(args.frames, bps) for name, bps in BITRATES.items()}
    with tempfile.TemporaryDirectory(prefix="qgw-bench-webrtc-") as tmp_name:
        tmp = Path(tmp_name)
        server, url = _signalling(tmp)
        try:
            calls = Calls(tmp, url, args.width, args.height, args.fps)
            print(f"latency: calls {', '.join(LATENCY_MODES)} at {args.width}x{args.height}, "
                  f"{args.seconds / 2:g} s window each", flush=True)
            res["latency"] = _latency(calls, args.seconds)
            print(f"rotation: {args.rotations} rotations every {args.interval:g} s",
                  flush=True)
            rotation = _rotation(calls, args.rotations, args.interval)
        finally:
            _stop(server)
    still = [c["counters"] for c in res["latency"]["calls"]]
    rotation["lost_per_s_without_rotation"] = _ratio(
        sum(c["lost"] for c in still), sum(c["shown_span_s"] for c in still))
    res["rotation"] = rotation
    res["in_call_us_per_video_frame"] = {
        "size": f"{args.width}x{args.height}",
        "seal": [v for c in still if "seal_us_per_video_frame" in c
                 for v in c["seal_us_per_video_frame"]],
        "open": [v for c in still if "open_us_per_video_frame" in c
                 for v in c["open_us_per_video_frame"]]}
    res["key_budget"] = _key_budget([1.0, 10.0, args.interval])
    res["loadavg_after"] = os.getloadavg()
    return res


def _f(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def report(res: dict[str, Any]) -> None:
    print(f"\n{res['cpus']} CPUs, load {res['loadavg_before'][0]:.2f} before / "
          f"{res['loadavg_after'][0]:.2f} after (1 min)")
    print(f"\n1. per-frame cost, {CODEC_SIZE[0]}x{CODEC_SIZE[1]} pattern, one thread (us)")
    print(f"{'VP8 target':12}{'bytes':>7}{'encode':>16}{'decode':>16}{'seal':>16}{'open':>16}"
          f"{'(s+o)/(e+d)':>13}")
    print(f"{'':12}{'mean':>7}" + f"{'p50':>9}/{'p99':<6}" * 4 + f"{'p50  mean':>13}")
    for name, fc in res["frame_cost"].items():
        cols = "".join(f"{_f(fc[k]['p50_us']):>9}/{_f(fc[k]['p99_us'], '.0f'):<6}"
                       for k in ("encode", "decode", "seal", "open"))
        ratios = (f"{_f(fc['sframe_over_codec_p50'], '.3f'):>7}"
                  f"{_f(fc['sframe_over_codec_mean'], '.3f'):>6}")
        print(f"{name:12}{fc['frame_bytes']['mean']:>7}{cols}{ratios}")
    for name, fc in res["frame_cost"].items():
        cs, ws, wo = fc["camera_sized"], fc["seal_back_to_back"], fc["open_back_to_back"]
        print(f"  {name}: encoded {fc['encoded_kbit_s']} kbit/s, {fc['key_frames']} key "
              f"frame(s), {fc['decoded_with_their_number']}/{fc['frames']} decoded to their "
              f"number, SFrame adds {fc['sframe_overhead_bytes']} B/frame")
        print(f"    back to back: seal p50/p99 {_f(ws['p50_us'])}/{_f(ws['p99_us'], '.0f')}, "
              f"open {_f(wo['p50_us'])}/{_f(wo['p99_us'], '.0f')}; camera-sized "
              f"{cs['frame_bytes']} B frames: seal {_f(cs['seal']['p50_us'])}/"
              f"{_f(cs['seal']['p99_us'], '.0f')}, open {_f(cs['open']['p50_us'])}/"
              f"{_f(cs['open']['p99_us'], '.0f')}")
    ic = res["in_call_us_per_video_frame"]
    spread = {k: f"{statistics.fmean(ic[k]):.1f} ({min(ic[k]):.1f}-{max(ic[k]):.1f})"
              if ic[k] else "-" for k in ("seal", "open")}
    print(f"  in the SFrame calls ({ic['size']}), as the participants report it, mean (min-max)"
          f" of {len(ic['seal'])}: seal {spread['seal']} us, open {spread['open']} us "
          "per video frame")
    lat = res["latency"]
    print(f"\n2. glass-to-glass latency, {lat['size']} at {lat['fps']:g} fps, both directions, "
          "made -> shown (ms)")
    print(f"{'call':16}{'n':>6}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}{'shown':>9}{'load':>7}"
          f"{'up after':>10}")
    for i, call in enumerate(lat["calls"]):
        r = call["latency"]
        shown = call["shown_of_made"] * 100 if call["shown_of_made"] is not None else None
        up = max((v for v in call["counters"]["call_up_s"] if v is not None), default=None)
        print(f"{i + 1}. {call['mode']:13}{r['n']:6d}{_f(r['p50_ms']):>9}{_f(r['p95_ms']):>9}"
              f"{_f(r['p99_ms']):>9}{_f(r['max_ms']):>9}{_f(shown):>8}%"
              f"{call['loadavg_1m']:7.2f}{_f(up):>8} s")
    for mode in ("plain", "sframe"):
        r = lat[mode]
        print(f"{mode + ', pooled':16}{r['n']:6d}{_f(r['p50_ms']):>9}{_f(r['p95_ms']):>9}"
              f"{_f(r['p99_ms']):>9}{_f(r['max_ms']):>9}")
    mc = lat["median_of_calls"]
    for mode in ("plain", "sframe"):
        print(f"{mode + ', median of calls':22}{_f(mc[mode]['p50_ms']):>9}"
              f"{_f(mc[mode]['p95_ms']):>9}")
    print(f"SFrame / plain: pooled p50 {_f(lat['ratio_p50'], '.3f')}x, p95 "
          f"{_f(lat['ratio_p95'], '.3f')}x (p50 {_f(lat['added_p50_ms'], '+.2f')} ms); "
          f"median of calls p50 {_f(lat['ratio_p50_median_of_calls'], '.3f')}x, "
          f"p95 {_f(lat['ratio_p95_median_of_calls'], '.3f')}x")
    rot = res["rotation"]
    drops = ", ".join(f"{k} {v}" for k, v in rot["sframe_drops"].items()) or "none"
    print(f"\n3. rotation every {rot['interval_s']:g} s: {rot['rotations_in_call']} of "
          f"{rot['rotations']} rotations during the call; frames lost {rot['lost']} "
          f"({rot['lost_near_switch']} within {NEAR_SWITCH_S} s of a switch, "
          f"{rot['lost_elsewhere']} elsewhere), SFrame drops: {drops}")
    print(f"   lost per rotation {_f(rot['lost_per_rotation'], '.3f')} (target 0); "
          f"lost per second {_f(rot['lost_per_s'], '.3f')} with rotation, "
          f"{_f(rot['lost_per_s_without_rotation'], '.3f')} in the calls without; "
          f"garbage {rot['counters']['garbage']}")
    kb = res["key_budget"]
    print(f"\n4. QKD key per hour of call ({KEY_BITS}-bit key per rotation), "
          "fraction of UC32's rates")
    print(f"{'rotation':10}{'kbit/h':>9}{'QKD 112k':>11}{'EC+PA 5k':>11}{'EC+PA 70k':>11}"
          f"{'4.2 Mbit keys':>16}")
    for name, row in kb["rows"].items():
        fr = row["fraction_of"]
        print(f"{name:10}{row['key_bits_per_h'] / 1e3:9.1f}" +
              "".join(f"{fr[k] * 100:>10.2f}%" for k in TRIAL_BPS) +
              f"{row['hours_keyed_by_field_test_4_2_mbit']:>13.2f} h")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.webrtc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="latency window of the SFrame call (each plain call: half)")
    ap.add_argument("--rotations", type=int, default=30)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between keys")
    ap.add_argument("--frames", type=int, default=300, help="720p frames per VP8 target")
    ap.add_argument("--width", type=int, default=640, help="of the calls' video")
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/webrtc.json"))
    args = ap.parse_args()
    if args.rotations < 1 or args.interval <= 0 or args.seconds <= 0 or args.frames < 1:
        ap.error("--rotations, --frames, --interval and --seconds must be positive")

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)   # unwinds through the calls' cleanups

    signal.signal(signal.SIGTERM, terminated)
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    report(res)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
