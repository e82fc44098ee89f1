"""The smoke check of the compose profile "webrtc": pictures crossed the call both ways,
SFrame-sealed under QKD keys, each checked against the sender's pattern.

    python /etc/qgw/smoke.py --camera webrtc-camera:9630 --viewer webrtc-viewer:9631

Polls both gateways' /metrics until each has shown --pictures verified pictures from
the other, then exits 0; exits 1 if either showed an undecodable picture (garbage), or
after --timeout seconds.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import urllib.request


def counters(address: str) -> dict[str, float]:
    """A participant's call counters (qgw_webrtc_call{counter=...}); {} if it is down."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=3) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^qgw_webrtc_call\{counter="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Wait for verified pictures both ways.")
    parser.add_argument("--camera", required=True, metavar="HOST:PORT",
                        help="the camera participant's metrics listener")
    parser.add_argument("--viewer", required=True, metavar="HOST:PORT",
                        help="the viewer participant's metrics listener")
    parser.add_argument("--pictures", type=int, default=60, help="pictures to wait for, each way")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    while True:
        c, v = counters(args.camera), counters(args.viewer)
        line = (f"viewer shows {v.get('pattern_ok', 0):.0f} camera pictures, camera shows "
                f"{c.get('pattern_ok', 0):.0f} viewer pictures; undecodable "
                f"{c.get('garbage', 0) + v.get('garbage', 0):.0f}, dropped "
                f"{c.get('video_dropped', 0) + v.get('video_dropped', 0):.0f}")
        if c.get("garbage", 0) or v.get("garbage", 0):
            print(f"FAILED: a participant showed an undecodable picture; {line}", flush=True)
            return 1
        if min(c.get("pattern_ok", 0), v.get("pattern_ok", 0)) >= args.pictures:
            print(f"OK: {line}", flush=True)
            return 0
        if time.monotonic() > deadline:
            print(f"FAILED: {args.pictures} pictures each way not shown in "
                  f"{args.timeout:g} s; {line}", flush=True)
            return 1
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
