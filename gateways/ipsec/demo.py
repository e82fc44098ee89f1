"""The IPsec step of `qgw demo`: two sites' subnets joined by kernel ESP keyed by QKD.

Site A's host streams numbered UDP datagrams to site B's host through the
gateway pair while the SAs are replaced every second (OPENQKD use case 31
rekeyed once a minute and noted QKD would allow once a second). Needs root and
a kernel with ESP; `qgw.kernelvm` runs this module in a VM where the host's
kernel has none:

    python -m gateways.ipsec.demo [--rekeys N]     # prints the result as JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gateways.ipsec.lab import IpsecLab
from qgw.netlab import temporary_lab

KEY_BITS = 256
REPO = Path(__file__).resolve().parents[2]


@dataclass
class IpsecResult:
    rekey_interval_s: float = 1.0
    tunnel_up_s: float = 0.0
    sent: int = 0
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    rekeys: int = 0
    rekey_latencies_s: list[float] = field(default_factory=list)
    key_sources: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.lost == 0 and self.duplicates == 0 and self.rekeys > 0

    @property
    def key_bits_per_hour(self) -> float:
        return KEY_BITS * 3600 / self.rekey_interval_s


def run_ipsec(rekeys: int = 10, interval_s: float = 1.0, rate: float = 200.0,
              progress: Callable[[str], None] = lambda s: None) -> IpsecResult:
    result = IpsecResult(rekey_interval_s=interval_s)
    with temporary_lab("qgw-ipsec-", "the IPsec step") as (lab, tmp):
        progress("IPsec: two sites, two gateways, two KMEs in namespaces")
        ipsec = IpsecLab(lab, tmp, keys={"rekey_interval_s": interval_s, "overlap_s": 0.5})
        started = time.monotonic()
        ipsec.start()
        progress("IPsec: gateways agreeing the first key, injecting SAs")
        ipsec.wait_protected()
        result.tunnel_up_s = time.monotonic() - started
        before = ipsec.metric("a", "qgw_session_rekeys_total")
        count = int(rate * interval_s * (rekeys + 1))
        progress(f"IPsec: {count} datagrams site A -> site B across {rekeys} rekeys")
        flow = ipsec.stream(count=count, rate=rate)
        result.rekeys = int(ipsec.metric("a", "qgw_session_rekeys_total") - before)
        result.sent = flow["sender"]["sent"]
        result.received, result.lost = flow["distinct"], flow["lost"]
        result.lost += result.sent - 1 - flow["highest"]  # a lost tail is loss too
        result.duplicates = flow["duplicates"]
        samples = ipsec.metrics("a")
        result.rekey_latencies_s = [v for k, v in samples.items()
                                    if k.startswith("qgw_session_rekey_seconds")]
        result.key_sources = sorted(
            k.split('source="')[1].split('"')[0] for k, v in samples.items()
            if k.startswith("qgw_session_key_source{") and v == 1.0)
    return result


def esp_missing() -> str | None:
    """What this kernel lacks for the IPsec gateway (None: it has ESP with AES-GCM).

    Probed in a network namespace of its own (unshare), so the throwaway SA of the
    check never touches the host's own XFRM state.
    """
    probe = ("from gateways.ipsec.xfrm import Xfrm, XfrmError\n"
             "try:\n    Xfrm().check_support()\n"
             "except XfrmError as exc:\n    print(exc)\n")
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", probe], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return f"could not probe the kernel for ESP: {(out.stderr or out.stdout).strip()}"
    return out.stdout.strip() or None


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gateways.ipsec.demo",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rekeys", type=int, default=10)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between rekeys")
    args = parser.parse_args()
    result = run_ipsec(args.rekeys, args.interval)
    print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
