"""Two `qgw gateway webrtc` participants in network namespaces, keyed by a KME pair.

Real processes end to end: the videocall signalling server, KME_A and KME_B
(an ETSI 004 stream SAE_A -> SAE_B), and both gateways as aiortc participants
(pattern camera and tone each way), media over the lab's bridge.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateways.webrtc.lab import CallLab
from qgw.netlab import Lab

pytestmark = pytest.mark.timeout(600)   # needs root: the `lab` fixture says so

CALL_COUNTERS = ("pattern_ok", "garbage", "lost", "duplicates", "out_of_order",
                 "video_dropped", "video_decoded")


def counters(call: CallLab, side: str) -> dict[str, float]:
    samples = call.metrics(side)
    out = {c: call.call_counter(side, c, samples) for c in CALL_COUNTERS}
    out["rotations"] = samples.get("qgw_webrtc_rotations_total", 0.0)
    out["protected"] = samples.get("qgw_webrtc_protected", 0.0)
    out["no_key"] = samples.get('qgw_webrtc_frames_dropped_total{reason="no_key"}', 0.0)
    for name, value in samples.items():
        if name.startswith("qgw_session_key_source{") and value == 1.0:
            out["source:" + name.split('source="')[1].split('"')[0]] = 1.0
    return out


def source(c: dict[str, float]) -> str | None:
    return next((k.split(":", 1)[1] for k in c if k.startswith("source:")), None)


def wait_until(what: str, check: Callable[[], bool], timeout_s: float, call: CallLab) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s:\n{call.logs()}"
        time.sleep(1)


def test_thirty_rotations_lose_no_frame_and_show_only_the_sent_pattern(
        lab: Lab, tmp_path: Path) -> None:
    call = CallLab(lab, tmp_path, keys={"rekey_interval_s": 2.0, "overlap_s": 1.0})
    call.start()
    call.wait_for("b", "pattern_ok", 10)
    start = {s: counters(call, s) for s in "ab"}
    wait_until("30 rotations", lambda: counters(call, "a")["rotations"]
               >= start["a"]["rotations"] + 30, 150, call)
    for side in "ab":
        end = counters(call, side)
        shown = end["pattern_ok"] - start[side]["pattern_ok"]
        # 2 s per rotation at 15 fps: about 900 pictures each way.
        assert shown >= 600, (side, end)
        # Make-before-break: every frame opens under a key the receiver already holds,
        # so no frame is dropped at a boundary; and nothing undecodable is ever shown.
        assert end["video_dropped"] == 0 and end["garbage"] == 0, (side, end)
        assert end["duplicates"] == 0 and end["out_of_order"] == 0, (side, end)
        assert end["lost"] <= 0.01 * end["pattern_ok"], (side, end)
        assert end["rotations"] >= 30 and source(end) == "qkd", (side, end)


@pytest.mark.parametrize("mode, keeps_sending", [("qkd", False), ("hybrid", False),
                                                 ("qkd-or-pqc", True)])
def test_kme_outage_mid_call_follows_the_supply_policy(lab: Lab, tmp_path: Path, mode: str,
                                                       keeps_sending: bool) -> None:
    call = CallLab(lab, tmp_path, keys={"mode": mode, "rekey_interval_s": 2.0,
                                        "overlap_s": 0.5, "grace_s": 2.0,
                                        "pool_target": 2, "pool_low": 1})
    call.start()
    call.wait_for("b", "pattern_ok", 10)
    want = "hybrid" if mode == "hybrid" else "qkd"
    # Under qkd-or-pqc the first key may be ML-KEM's, if the KME answered late at start.
    wait_until(f"{want} keys", lambda: source(counters(call, "a")) == want, 60, call)
    lab.kill("kme-a")
    if keeps_sending:
        wait_until("the ML-KEM fallback", lambda: source(counters(call, "a")) == "pqc",
                   90, call)
        before = counters(call, "b")["pattern_ok"]
        time.sleep(4)
        after = counters(call, "b")
        assert after["pattern_ok"] >= before + 30, after   # the picture goes on
    else:
        # Fail closed: the camera stops sending (no key, never in clear); the viewer's
        # picture freezes and nothing undecodable is shown.
        wait_until("failing closed", lambda: counters(call, "a")["protected"] == 0.0,
                   90, call)
        time.sleep(2)   # frames sealed just before the switch are still in flight
        frozen = counters(call, "b")["video_decoded"]
        time.sleep(4)
        a, b = counters(call, "a"), counters(call, "b")
        assert b["video_decoded"] == frozen and a["no_key"] > 0, (a, b)
    assert counters(call, "b")["garbage"] == 0
    # The KME comes back: QKD keys again, and the picture with them.
    call.start_kme("a")
    wait_until("QKD keys again", lambda: source(counters(call, "a")) == want, 120, call)
    resumed = counters(call, "b")["pattern_ok"]
    wait_until("the picture again", lambda: counters(call, "b")["pattern_ok"] >= resumed + 30,
               60, call)
    assert counters(call, "b")["garbage"] == 0
