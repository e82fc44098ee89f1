"""The smoke check of the compose profile "ledger": readings made it from the sensors
through the writer and the ledger to the reader, decrypted.

    python /etc/qgw/smoke.py --writer ledger-writer:9620 --reader ledger-reader:9621

Polls both gateways' /metrics until the reader has decrypted --readings readings, then
exits 0; exits 1 if the reader rejected any batch or record (forged, tampered, no key...),
or after --timeout seconds. At the trial's pace (10 devices, one reading a minute each) a
reading comes every 6 s.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import urllib.request


def metrics(address: str) -> dict[str, float]:
    """The sums of a gateway's samples by metric name (labels added up); {} if it is down."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=3) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    sums: dict[str, float] = {}
    for match in re.finditer(r"^(\w+)(?:\{.*\})? (\S+)$", text, re.MULTILINE):
        sums[match.group(1)] = sums.get(match.group(1), 0.0) + float(match.group(2))
    return sums


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Wait for readings decrypted at the reader.")
    parser.add_argument("--writer", required=True, metavar="HOST:PORT",
                        help="the writer's metrics listener")
    parser.add_argument("--reader", required=True, metavar="HOST:PORT",
                        help="the reader's metrics listener")
    parser.add_argument("--readings", type=int, default=3, help="readings to wait for")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    while True:
        w, r = metrics(args.writer), metrics(args.reader)
        delivered = r.get("qgw_ledger_readings_delivered_total", 0.0)
        rejected = r.get("qgw_ledger_rejected_total", 0.0)
        line = (f"writer: received {w.get('qgw_ledger_readings_received_total', 0):.0f}, "
                f"refused {w.get('qgw_ledger_readings_refused_total', 0):.0f}, anchored "
                f"{w.get('qgw_ledger_records_anchored_total', 0):.0f} in "
                f"{w.get('qgw_ledger_batches_anchored_total', 0):.0f} batches; reader: "
                f"decrypted {delivered:.0f}, rejected {rejected:.0f}")
        if rejected:
            print(f"FAILED: the reader rejected records or batches; {line}", flush=True)
            return 1
        if delivered >= args.readings:
            print(f"OK: {line}", flush=True)
            return 0
        if time.monotonic() > deadline:
            print(f"FAILED: {args.readings} readings not decrypted in {args.timeout:g} s; "
                  f"{line}", flush=True)
            return 1
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
