"""`qgw gateway webrtc` with `media: browser`: a real Chromium page keyed by a real session.

The lab of test_call_netns.py (gateways/webrtc/lab.py): the signalling server in
`call`; in `part-a` KME_A and the camera's gateway (aiortc, the key master); in
`part-b` KME_B, the viewer's gateway (`media: browser`, the slave) and headless
Chromium, which opens the page link that gateway prints, so the page's
`ws://127.0.0.1:<port>` key URL reaches the gateway on part-b's own loopback. Keys
are an ETSI 004 stream SAE_A -> SAE_B through the gateways' KeySession; the browser's
fake camera plays the test pattern, so the camera gateway checks it is the page's
picture it shows. Needs root and the Debian package chromium.
"""

from __future__ import annotations

import re
import time
from itertools import pairwise
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from gateways.webrtc.lab import CallLab
from qgw.netlab import Lab
from tests.gateways.webrtc.test_browser import write_pattern_y4m
from tests.gateways.webrtc.test_call_netns import counters, source, wait_until
from tests.webrtc_browser import CHROMIUM_FLAGS, chromium, end_group

pytestmark = pytest.mark.timeout(300)   # needs root: the `lab` fixture says so

LINK_HEADER = "Open this participant's page"
PAGE = 'qgw_webrtc_page{counter="'
# A 32-byte key as the handoff sends it (standard base64, 44 characters with padding).
BASE64_KEY = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}=")


def page_link(lab: Lab, call: CallLab, timeout_s: float = 60) -> str:
    """The link the viewer's gateway prints for its user (the line after the header)."""
    log = lab.logs("webrtc-b")
    deadline = time.monotonic() + timeout_s
    while True:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        for header, link in pairwise(lines):
            if header.startswith(LINK_HEADER):
                return link.strip()
        assert time.monotonic() < deadline, f"no page link within {timeout_s} s:\n{call.logs()}"
        time.sleep(0.5)


def viewer(call: CallLab) -> dict[str, float]:
    """The viewer gateway's view: the page's counters (as its metrics show them), the
    pages connected, and the gateway's own rotations and key source."""
    samples = call.metrics("b")
    out = {name[len(PAGE):-2]: value for name, value in samples.items()
           if name.startswith(PAGE)}
    out["pages"] = samples.get("qgw_webrtc_pages", 0.0)
    out["gateway_rotations"] = samples.get("qgw_webrtc_rotations_total", 0.0)
    for name, value in samples.items():
        if name.startswith("qgw_session_key_source{") and value == 1.0:
            out["source:" + name.split('source="')[1].split('"')[0]] = 1.0
    return out


def test_browser_viewer_and_aiortc_camera_call_keyed_by_qkd(lab: Lab, tmp_path: Path) -> None:
    call = CallLab(lab, tmp_path, keys={"rekey_interval_s": 2.0, "overlap_s": 1.0})
    call.configs["b"] = call.write_config("b", media="browser")
    call.start()
    link = page_link(lab, call)
    origin = call.signal_url
    assert link.startswith(f"{origin}/?room=lab&name=viewer#keys="), link
    keys_url = unquote(link.split("#keys=", 1)[1])
    assert keys_url.startswith("ws://127.0.0.1:8765/keys?token="), keys_url
    token = parse_qs(urlsplit(keys_url).query)["token"][0]

    camera = write_pattern_y4m(tmp_path / "pattern.y4m")
    lab.start("chromium", [
        chromium(), *CHROMIUM_FLAGS,
        # The page is served over plain http from the call namespace's address; it needs
        # a secure context for getUserMedia and WebCrypto (the flag needs a profile dir).
        f"--unsafely-treat-insecure-origin-as-secure={origin}",
        f"--use-file-for-fake-video-capture={camera}",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", link,
    ], env=None, ns_of="part-b")
    try:
        def flowing() -> bool:
            page, cam = viewer(call), counters(call, "a")
            return (page["pages"] == 1 and page.get("video_frames_decoded", 0) >= 15
                    and cam["pattern_ok"] >= 15)

        wait_until("video both ways", flowing, 60, call)
        page0, cam0 = viewer(call), counters(call, "a")
        wait_until("two rotations with media both ways", lambda: (
            viewer(call)["gateway_rotations"] >= page0["gateway_rotations"] + 2
            and counters(call, "a")["rotations"] >= cam0["rotations"] + 2), 30, call)
        time.sleep(2)   # and some media under the last key
        page, cam = viewer(call), counters(call, "a")
        explain = f"page {page0} -> {page}\ncamera {cam0} -> {cam}\n{call.logs()}"

        # The camera's gateway shows the browser's pictures, through every rotation:
        # its pattern, opened under the session's keys, nothing undecodable shown.
        assert cam["pattern_ok"] - cam0["pattern_ok"] >= 30, explain
        assert cam["video_decoded"] > cam0["video_decoded"], explain
        assert cam["garbage"] == 0, explain
        # Make-before-break: the page only sends under a key the camera already holds.
        assert cam["video_dropped"] == cam0["video_dropped"], explain
        assert cam["rotations"] >= 2 and source(cam) == "qkd", explain

        # The viewer's gateway: one page on its handoff, which opens the camera's frames
        # with the keys handed to it (the decoder sees nothing SFrame did not open) and
        # rotates with the session.
        assert page["pages"] == 1, explain
        assert page["frames_decrypted"] > page0["frames_decrypted"], explain
        assert page["frames_encrypted"] > page0["frames_encrypted"], explain
        assert page["video_frames_decoded"] - page0["video_frames_decoded"] >= 30, explain
        assert page["decrypt_failures"] == 0 and page["malformed"] == 0, explain
        # A camera frame the browser still held when its gateway retired the old KID
        # (overlap_s after the switch) may arrive late under load; none fails to open.
        assert page["unknown_kid"] - page0["unknown_kid"] <= 2, explain
        assert page["video_frames_decoded"] <= page["video_frames_opened"] + 45, explain
        assert page["rotations"] >= page0["rotations"] + 2, explain
        assert page["gateway_rotations"] >= 2 and source(page) == "qkd", explain
    finally:
        end_group(lab.procs.pop("chromium"))

    # The handoff token goes to the user once, on the line the CLI prints, and nowhere
    # else: not in a log line of any process, not to the signalling server (the page
    # keeps it in the link's fragment). Chromium's own log is not ours to vouch for.
    logs = {p.stem: p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log")
            if p.stem != "chromium"}
    assert set(logs) >= {"signal", "kme-a", "kme-b", "webrtc-a", "webrtc-b"}, sorted(logs)
    lines = logs["webrtc-b"].splitlines()
    assert [line.strip() for line in lines if token in line] == [link]
    assert all(token not in text for name, text in logs.items() if name != "webrtc-b")
    # Nor does any key the handoff sent the page show up in a gateway's log.
    for name in ("webrtc-a", "webrtc-b"):
        assert not BASE64_KEY.search(logs[name]), (name, BASE64_KEY.findall(logs[name]))
