"""Benchmark: the IPsec gateway pair against the same path without IPsec, on a kernel with ESP.

The lab is `gateways.ipsec.lab.IpsecLab`: site-a -- gw-a == transit == gw-b -- site-b,
one network namespace each, a KME per gateway. Where the host's kernel has no ESP (CI's,
this machine's), the whole benchmark runs inside Debian's kernel under qemu
(`qgw.kernelvm`); absolute numbers then carry the emulation's cost, the ratios compare
phases measured in the same VM, one after the other:

- plain:   the gateways' namespaces only route (no policies, no SAs): the baseline.
           Run first and again last (drift check); ratios are against the mean.
- ipsec:   `qgw gateway ipsec` on both gateways, SAs replaced every --interval seconds.

Measured:

- throughput: iperf3 TCP site-a -> site-b for --seconds, in both phases (ratio).
- loss across rekeys: a numbered UDP stream (apps.udpstream) at --rate datagrams/s
  across --rekeys rekeys: lost, duplicated, reordered (target: 0 lost).
- rekey latency: the master's `qgw_session_rekey_seconds` (offer sent -> the slave
  has installed the new inbound SA and switched its outbound -> the master switches),
  sampled every 0.25 s during the stream; distinct values, p50/p99. The key was already
  fetched (the master keeps a prefetched pool), so this is key-in-hand to new SAs active
  on both sides.
- QKD key per hour at rekey intervals of 1, 10 and 60 s (one 256-bit key per rekey),
  next to the trials' link rates (UC45 2.72 kbit/s, UC28 1.8 kbit/s), and the keys the
  master actually fetched during the run.

Needs root, iperf3 (`apt-get install iperf3`; benchmarks do not run in CI) and, where the
host has no ESP, what `qgw.kernelvm` needs (qemu-system-x86, linux-image-amd64,
busybox-static, virtme-ng: scripts/test installs them).

Run: python -m bench.ipsec [--rekeys 100] [--interval 1] [--rate 200] [--seconds 10]
                           [--out bench/results/ipsec.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from gateways.ipsec.lab import PY, IpsecLab, host_ip
from qgw.netlab import temporary_lab

KEY_BITS = 256
LINK_RATES_BPS = {"UC45": 2720.0, "UC28": 1800.0}
REPO = Path(__file__).resolve().parents[1]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1] if ordered else float("nan")


def _iperf(ipsec: IpsecLab, seconds: float) -> float:
    """TCP goodput site-a -> site-b, Mbit/s (iperf3's receiver side)."""
    ipsec.lab.start("iperf-server", ["iperf3", "-s", "-1", "-B", host_ip("b")], env=None,
                    ns_of="site-b")
    time.sleep(1.0)
    out = ipsec.run("site-a", ["iperf3", "-c", host_ip("b"), "-t", str(seconds), "-J"],
                    seconds + 120)
    ipsec.lab.procs.pop("iperf-server").wait(timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"iperf3 failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e6


def _sample_rekeys(ipsec: IpsecLab, stop: threading.Event, out: list[float]) -> None:
    last = None
    while not stop.wait(0.25):
        try:
            value = ipsec.metric("a", "qgw_session_rekey_seconds")
        except AssertionError:
            continue
        if value and value != last:
            out.append(value)
            last = value


def inside(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"args": vars(args) | {"out": str(args.out)},
                           "loadavg_before": os.getloadavg(), "cpus": os.cpu_count(),
                           "kernel": os.uname().release}
    with temporary_lab("qgw-bench-ipsec-", "bench.ipsec") as (lab, tmp):
        ipsec = IpsecLab(lab, tmp, keys={"rekey_interval_s": args.interval, "overlap_s": 0.5})
        print("plain: routing only", flush=True)
        plain = [_iperf(ipsec, args.seconds)]
        ipsec.start()
        ipsec.wait_protected(timeout_s=300)
        print("ipsec: tunnel up", flush=True)
        tunnel = _iperf(ipsec, args.seconds)
        fetched0 = ipsec.metric("a", "qgw_session_keys_fetched_total")
        rekeys0 = ipsec.metric("a", "qgw_session_rekeys_total")
        latencies: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rekeys, args=(ipsec, stop, latencies))
        sampler.start()
        count = int(args.rate * args.interval * (args.rekeys + 2))
        print(f"ipsec: {count} datagrams across {args.rekeys} rekeys", flush=True)
        flow = ipsec.stream(count=count, rate=args.rate, timeout_s=count / args.rate + 300)
        stop.set()
        sampler.join()
        rekeys = ipsec.metric("a", "qgw_session_rekeys_total") - rekeys0
        fetched = ipsec.metric("a", "qgw_session_keys_fetched_total") - fetched0
        for site in "ab":  # SIGTERM: each gateway removes its SAs and policies
            lab.kill(f"ipsec-{site}", signal.SIGTERM)
        plain.append(_iperf(ipsec, args.seconds))
    baseline = statistics.mean(plain)
    res |= {
        "throughput_mbps": {"plain": plain, "ipsec": tunnel, "ratio": tunnel / baseline},
        "stream": flow, "rekeys": rekeys, "keys_fetched": fetched,
        "lost_per_100_rekeys": 100 * flow["lost"] / rekeys if rekeys else None,
        "rekey_latency_s": {"samples": latencies, "p50": _pct(latencies, 0.5),
                            "p99": _pct(latencies, 0.99)},
        "key_per_hour": {
            f"{i}s": {"bits": KEY_BITS * 3600 / i,
                      **{uc: KEY_BITS / i / bps for uc, bps in LINK_RATES_BPS.items()}}
            for i in (1, 10, 60)},
        "loadavg_after": os.getloadavg(),
    }
    return res


def report(res: dict[str, Any]) -> None:
    t, s, lat = res["throughput_mbps"], res["stream"], res["rekey_latency_s"]
    print(f"kernel {res['kernel']}, {res['cpus']} CPUs, load {res['loadavg_before'][0]:.2f} "
          f"before / {res['loadavg_after'][0]:.2f} after")
    print(f"throughput TCP: plain {' / '.join(f'{v:.1f}' for v in t['plain'])} Mbit/s, "
          f"ipsec {t['ipsec']:.1f} Mbit/s ({t['ratio']:.2f}x of plain)")
    print(f"stream across {res['rekeys']:.0f} rekeys: sent {s['sender']['sent']}, "
          f"received {s['distinct']}, lost {s['lost']}, duplicates {s['duplicates']}, "
          f"reordered {s['reordered']}")
    print(f"rekey latency (offer -> new SAs active both sides): p50 {lat['p50'] * 1e3:.1f} ms,"
          f" p99 {lat['p99'] * 1e3:.1f} ms over {len(lat['samples'])} samples")
    for interval, k in res["key_per_hour"].items():
        print(f"key per hour at {interval:>3}: {k['bits'] / 1e3:8.1f} kbit "
              f"({k['UC45'] * 100:.2f}% of UC45's 2.72 kbit/s link, "
              f"{k['UC28'] * 100:.2f}% of UC28's 1.8 kbit/s)")
    print(f"keys fetched by the master during the run: {res['keys_fetched']:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.ipsec", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rekeys", type=int, default=100)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between rekeys")
    ap.add_argument("--rate", type=float, default=200.0, help="stream datagrams per second")
    ap.add_argument("--seconds", type=float, default=10.0, help="iperf3 duration per phase")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ipsec.json"))
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if shutil.which("iperf3") is None:
        sys.exit("bench.ipsec needs iperf3 (apt-get install iperf3)")
    from gateways.ipsec.xfrm import EspUnsupported, Xfrm

    if not args.inside:
        try:
            with Xfrm() as x:
                x.check_support()
        except EspUnsupported as exc:
            sys.exit(_in_vm(args, str(exc)))
    res = inside(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    report(res)


def _in_vm(args: argparse.Namespace, why: str) -> int:
    from qgw import kernelvm

    print(f"{why}\n-> running the benchmark in Debian's kernel under qemu", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    with tempfile.TemporaryDirectory(dir=out.parent) as rw:
        inner = Path(rw) / out.name
        argv = [PY, "-m", "bench.ipsec", "--inside", "--rekeys", str(args.rekeys),
                "--interval", str(args.interval), "--rate", str(args.rate),
                "--seconds", str(args.seconds), "--out", str(inner)]
        result = kernelvm.run_in_vm(argv, cwd=REPO, rwdirs=[Path(rw)], timeout_s=7200,
                                    on_line=lambda line: print(f"  vm| {line}", flush=True))
        if result.returncode != 0 or not inner.exists():
            print(result.tail(), file=sys.stderr)
            return 1
        shutil.copy(inner, out)
    report(json.loads(out.read_text()))
    return 0


if __name__ == "__main__":
    main()
